"""HPSv2 / HPSv2.1 reward: Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341).

HPS v2 is OpenCLIP ViT-H/14 fine-tuned on the HPD v2 preference pairs; the score is the plain cosine of the
normalised image and text features, with no logit scale (``shared/REFERENCE.md`` §7)::

    reward = ⟨E_img(image)/‖·‖, E_txt(prompt)/‖·‖⟩  ∈ [-1, 1]   (generated images: about 0.2–0.35)

Checkpoints (hub repository ``xswu/HPSv2``): ``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt`` (v2.1),
each ``{"state_dict": ...}`` for open_clip's ``ViT-H-14``. Preprocessing follows HPSv2's evaluation transform: the
longer side is resized to 224 (bicubic, antialiased), the shorter one padded with black to a centred square, then
CLIP's mean/std normalisation. Prompts use open_clip's tokenizer (77 tokens).

Dependencies: open_clip (``open_clip_torch``, or the copy vendored by the ``hpsv2`` package) and a torchvision that
matches torch. They do not fit flowrl's training environment: the ``hpsv2`` package pins ``pytest==7.2.0`` and
``protobuf<4`` and its wheel lacks its BPE vocabulary, and open_clip imports torchvision, whose registry wheels are
CUDA builds that fail beside a CPU torch. The supported route is a separate virtual environment serving this reward
with ``python -m flowrl.reward_server --reward hpsv2`` and training with ``reward=remote``; the ImportError raised
here spells out the commands.
"""

from __future__ import annotations

import numpy as np

from ._deps import IMPORT_FAILURES, remote_route

HPS_REPO = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_PIP = "pip install open_clip_torch torchvision"
HPS_PORT = 18087
# OpenAI CLIP's image normalisation, which open_clip's ViT-H-14 (and HPS) use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def import_open_clip():
    """open_clip, or the copy inside the ``hpsv2`` package; else ImportError with the reward-server route.

    Raises:
        ImportError: neither imports (a missing package, or torchvision failing at import). The message contains
            ``pip install open_clip_torch torchvision`` and the venv + reward-server commands.
    """
    try:
        import open_clip

        return open_clip
    except IMPORT_FAILURES as e:
        first = e
    try:
        from hpsv2.src import open_clip

        return open_clip
    except IMPORT_FAILURES:
        pass
    ckpt = f"/path/to/{HPS_CHECKPOINTS['v2.1']}"
    raise ImportError(
        f"reward 'hpsv2' needs open_clip with a working torchvision, which this environment cannot import "
        f"({type(first).__name__}: {first}). They, and the hpsv2 package (which pins pytest==7.2.0 and protobuf<4), "
        f"clash with flowrl's training environment, so install them in a virtual environment of their own with "
        f"`{HPS_PIP}`. {remote_route('hpsv2', '.venv-hps', HPS_PIP, HPS_PORT, f' --arg checkpoint={ckpt}')}\n"
        f"Get the checkpoint with: .venv-hps/bin/hf download {HPS_REPO} {HPS_CHECKPOINTS['v2.1']} --local-dir /path/to"
    ) from first


def hps_preprocess(torch, images: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """HPSv2's evaluation transform for uint8 ``[B, H, W, 3]`` images → float32 ``[B, 3, size, size]``: scale to
    [0, 1], resize the longer side to ``size`` (bicubic, antialiased), pad the shorter side with zeros (black) to a
    centred square, normalise with ``mean``/``std``."""
    F = torch.nn.functional
    out = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)
        h, w = x.shape[1:]
        scale = size / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
            ph, pw = size - nh, size - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        out.append(x)
    x = torch.stack(out)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class HPSv2Reward:
    """HPSv2/HPSv2.1 reward (``reward=hpsv2``): cosine of normalised open_clip ViT-H-14 image/text features with the
    HPS checkpoint.

    Args:
        checkpoint: path of ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``; ``None`` downloads the one of
            ``version`` from the hub repository ``xswu/HPSv2`` (read from the cache when ``HF_HUB_OFFLINE=1``).
        version: ``"v2.1"`` (default) or ``"v2.0"``; only used when ``checkpoint`` is None.
        model_name: open_clip architecture (``ViT-H-14``).
        device: torch device (default: this process's CUDA device if any, else CPU).
        dtype: float32 / float16 / bfloat16 (features are compared in float32).
        batch_size: image-prompt pairs per forward pass.

    Call: ``images`` uint8 ``[B, H, W, 3]``, ``prompts`` (B strings); metadata ignored. Returns ``reward`` float32
    ``[B]`` in ``[-1, 1]``.

    Raises:
        ImportError: open_clip/torchvision cannot be imported — the message gives ``pip install open_clip_torch
            torchvision`` and the separate-venv + ``python -m flowrl.reward_server --reward hpsv2`` route.
        ValueError: unknown ``version``, bad dtype/batch size, images not uint8 ``[B, H, W, 3]``, prompt count ≠ B.
        RuntimeError: the checkpoint lacks weights the model needs.
    """

    name = "hpsv2"

    def __init__(self, checkpoint: str | None = None, version: str = "v2.1", model_name: str = "ViT-H-14",
                 device=None, dtype="float32", batch_size: int = 16):
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"reward 'hpsv2': unknown version {version!r}; use one of {sorted(HPS_CHECKPOINTS)}")
        if batch_size < 1:
            raise ValueError(f"reward 'hpsv2': batch_size must be ≥ 1 (got {batch_size})")
        open_clip = import_open_clip()
        import torch

        from ._clip_common import resolve_device, resolve_dtype

        self.torch, self.batch_size = torch, int(batch_size)
        self.device, self.dtype = resolve_device(torch, device), resolve_dtype(torch, dtype)
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(HPS_REPO, HPS_CHECKPOINTS[version])
        model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, _unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"HPS checkpoint {checkpoint!r} lacks {len(missing)} weights of open_clip "
                               f"{model_name} (first: {missing[:5]}); is it an HPSv2 checkpoint?")
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None
                 ) -> dict[str, np.ndarray]:
        from ._clip_common import check_batch

        check_batch(images, prompts, self.name)
        torch, out = self.torch, []
        for i in range(0, len(images), self.batch_size):
            x = hps_preprocess(torch, images[i : i + self.batch_size], self.image_size, self.mean, self.std)
            tok = self.tokenizer(list(prompts[i : i + self.batch_size]))
            with torch.inference_mode():
                img = self.model.encode_image(x.to(self.device, self.dtype)).float()
                txt = self.model.encode_text(tok.to(self.device)).float()
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((img * txt).sum(-1).cpu().numpy())
        return {"reward": np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)}
