"""LAION aesthetic predictor v2 reward ("improved aesthetic predictor", C. Schuhmann, LAION 2022).

The image's CLIP ViT-L/14 embedding (768-d, projected), L2-normalised, goes through a small MLP trained to regress
human aesthetic ratings (SAC + LAION-Logos + AVA, 1–10 scale)::

    e = E_img(image) / ‖E_img(image)‖
    reward = L5(L4(L3(L2(L1(e)))))     L1: 768→1024, L2: 1024→128, L3: 128→64, L4: 64→16, L5: 16→1

No activation functions: the head is affine as a whole. Its dropouts (0.2 after L1 and L2, 0.1 after L3) only act
in training; the reward runs the head in eval mode. DDPO (arXiv 2305.13301) and Flow-GRPO (arXiv 2505.05470) use it
as the "aesthetic" reward; ``shared/REFERENCE.md`` §7.

The real head weights are the file ``sac+logos+ava1-l14-linearMSE.pth`` (a torch state dict, keys
``layers.{0,2,4,6,7}.{weight,bias}``) at the root of the GitHub repository
christophschuhmann/improved-aesthetic-predictor (direct link: :data:`HEAD_URL`); copies also ship in DDPO's and
Flow-GRPO's ``assets`` folders. No package on PyPI ships it: download it once and
pass its path as ``head``. Dependencies: torch and transformers only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._clip_common import ClipEmbedder, check_batch

HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
            "sac%2Blogos%2Bava1-l14-linearMSE.pth")
HIDDEN = (1024, 128, 64, 16)
# Positions of the Linear layers inside the original nn.Sequential (dropouts sit at 1, 3 and 5): the state-dict keys
# of the published weights depend on them.
LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def build_head(torch, in_dim: int = 768):
    """The predictor head as a module with the published layout (``.layers`` = Linear, Dropout, Linear, Dropout,
    Linear, Dropout, Linear, Linear), so that ``sac+logos+ava1-l14-linearMSE.pth`` loads into it unchanged."""
    nn = torch.nn
    dims = (in_dim, *HIDDEN, 1)
    mods, k = [], 0
    for i in range(LINEAR_INDICES[-1] + 1):
        if i in DROPOUTS:
            mods.append(nn.Dropout(DROPOUTS[i]))
        else:
            mods.append(nn.Linear(dims[k], dims[k + 1]))
            k += 1
    head = nn.Module()
    head.layers = nn.Sequential(*mods)
    return head


def load_head_state(torch, path: str | Path) -> dict:
    """The head's state dict from a ``.pth``/``.pt`` (``torch.load``, weights only) or ``.safetensors`` file; a
    ``{"state_dict": ...}`` wrapper and bare ``nn.Sequential`` keys (``0.weight``) are accepted.

    Raises:
        FileNotFoundError: no such file (the message says where the real head comes from).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"aesthetic head {str(p)!r} not found; download sac+logos+ava1-l14-linearMSE.pth "
                                f"from {HEAD_URL} and pass its path as reward.args.head")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return {(k if k.startswith("layers.") else f"layers.{k}"): v for k, v in sd.items()}


class AestheticReward:
    """LAION aesthetic predictor v2 (``reward=aesthetic``): MLP head on the unit-norm CLIP ViT-L/14 image embedding.

    Args:
        head: path of the head's weights (``sac+logos+ava1-l14-linearMSE.pth`` for the real predictor, see
            :data:`HEAD_URL`; ``.pth``/``.pt``/``.safetensors``). Its input width must equal the CLIP model's
            ``projection_dim`` (768 for ViT-L/14).
        model: hub id (default ``openai/clip-vit-large-patch14``) or local directory of a ``CLIPModel`` with its
            ``CLIPProcessor``.
        device: torch device (default: this process's CUDA device if any, else CPU).
        dtype: CLIP dtype (float32 / float16 / bfloat16); the head always runs in float32.
        batch_size: images per forward pass (results do not depend on it).

    Call: ``images`` uint8 ``[B, H, W, 3]``; prompts and metadata are ignored. Returns ``reward`` float32 ``[B]``:
    the predicted rating, about 1–10 for the real head (4–6 for ordinary photos, unbounded in principle: the head is
    affine). Differentiable (:meth:`differentiable`), so it can drive ``algorithm=draft``.

    Raises:
        ValueError: ``head`` not given, or its tensors do not match ``in_dim→1024→128→64→16→1``; bad
            ``dtype``/``batch_size``; at call time images not uint8 ``[B, H, W, 3]``.
        FileNotFoundError: ``head`` does not exist.
        ImportError: torch/transformers cannot be imported (the message has the ``pip install`` line).
        OSError: the CLIP model or processor cannot be found.
    """

    name = "aesthetic"

    def __init__(self, head: str | None = None, model: str = "openai/clip-vit-large-patch14", device=None,
                 dtype="float32", batch_size: int = 32):
        if head is None:
            raise ValueError("reward 'aesthetic' needs reward.args.head = path of the predictor weights "
                             f"(sac+logos+ava1-l14-linearMSE.pth, from {HEAD_URL})")
        if batch_size < 1:
            raise ValueError(f"reward 'aesthetic': batch_size must be ≥ 1 (got {batch_size})")
        self.batch_size = int(batch_size)
        self.embedder = ClipEmbedder(model, None, device, dtype, self.name)
        torch = self.embedder.torch
        in_dim = int(self.embedder.model.config.projection_dim)
        self.head = build_head(torch, in_dim)
        state = load_head_state(torch, head)
        expected = {k: tuple(v.shape) for k, v in self.head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ValueError(f"aesthetic head {head!r} does not fit a {in_dim}→1024→128→64→16→1 predictor on "
                             f"this CLIP model: expected tensors {expected}, file has {got}")
        self.head.load_state_dict({k: v.float() for k, v in state.items()})
        self.head.to(self.embedder.device).eval().requires_grad_(False)

    def __call__(self, images: np.ndarray, prompts: list[str] | None = None, metadata: list[dict] | None = None
                 ) -> dict[str, np.ndarray]:
        check_batch(images, None, self.name)
        torch = self.embedder.torch
        out = []
        for i in range(0, len(images), self.batch_size):
            emb = self.embedder.image_embeds(images[i : i + self.batch_size])
            with torch.inference_mode():
                out.append(self.head.layers(emb).squeeze(-1).cpu().numpy())
        return {"reward": np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)}

    def differentiable(self, images, prompts: list[str] | None = None, metadata: list[dict] | None = None):
        """The predicted rating as a differentiable function of the images (DRaFT / ReFL, :mod:`flowrl.draft`).

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1] with their autograd graph; prompts and metadata are ignored.

        Returns:
            ``[B]`` float32 tensor on the images' device, on the scale of ``__call__``'s ``reward`` (equal up to the
            uint8 rounding of the images). CLIP and head weights never receive gradients.

        Raises:
            ValueError: images not ``[B, 3, H, W]``.
        """
        torch = self.embedder.torch
        parts = [self.head.layers(self.embedder.image_embeds_differentiable(images[i : i + self.batch_size])).squeeze(-1)
                 for i in range(0, images.shape[0], self.batch_size)]
        out = torch.cat(parts) if parts else torch.zeros(0, device=self.embedder.device)
        return out.to(images.device)
