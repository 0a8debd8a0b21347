"""Shared machinery of the transformers-CLIP rewards (CLIPScore, PickScore, LAION aesthetic).

Loads a ``transformers.CLIPModel`` and its ``CLIPProcessor`` with ``from_pretrained`` (a hub id, resolved from the
local cache when ``HF_HUB_OFFLINE=1``, or a local directory) and computes L2-normalised image and text embeddings
in chunks. torch and transformers are imported when a reward is built, not when this module is imported.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._deps import require

TRANSFORMERS_PIP = 'pip install "transformers>=4.51" torch'

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def import_torch_transformers(reward: str) -> tuple[Any, Any]:
    """``(torch, transformers)``, or ImportError naming :data:`TRANSFORMERS_PIP`."""
    torch = require("torch", reward, TRANSFORMERS_PIP)
    transformers = require("transformers", reward, TRANSFORMERS_PIP)
    return torch, transformers


def resolve_dtype(torch, dtype) -> Any:
    """A ``torch.dtype`` from a dtype or one of the names float32/fp32/float16/fp16/half/bfloat16/bf16.

    Raises:
        ValueError: any other value.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[key])


def resolve_device(torch, device) -> Any:
    """``device`` as a ``torch.device``; ``None`` picks this process's current CUDA device if any, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def check_batch(images: np.ndarray, prompts: list[str] | None, reward: str) -> None:
    """Raises ValueError unless ``images`` is uint8 ``[B, H, W, 3]`` (and ``prompts``, if given, has B entries)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"reward {reward!r} expects uint8 images [B, H, W, 3], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"reward {reward!r}: {len(images)} images but {len(prompts)} prompts")


def _field(d, key):
    """``d[key]`` of a processor size dict (a plain dict or transformers' ``SizeDict``), ``None`` when absent."""
    if d is None:
        return None
    if isinstance(d, dict):
        return d.get(key)
    return getattr(d, key, None)


def torch_preprocess(image_processor, images, torch):
    """The ``CLIPImageProcessor`` pipeline in torch, differentiable with respect to ``images``.

    Same steps and sizes as the processor's numpy/PIL path (``__call__`` of the CLIP rewards): resize so that the
    shortest edge is ``size["shortest_edge"]`` (the long edge ``int(S·long/short)``, as transformers computes it), or
    to ``size["height"] × size["width"]``, with ``torch.nn.functional.interpolate`` (bicubic or bilinear as the
    processor's ``resample``, ``antialias=True``: the same filter family as PIL's resize), centre crop to
    ``crop_size`` (top/left offsets ``(H - h) // 2``, zero padding if the image is smaller), rescale and normalise
    with the processor's ``image_mean`` / ``image_std``. The numpy path additionally rounds to uint8 before and after
    PIL's resize; the difference is measured in ``tests/test_draft.py`` (≈1e-3 on the cosine).

    Args:
        image_processor: a ``CLIPImageProcessor`` (any backend; only its settings are read).
        images: ``[B, 3, H, W]`` float in [0, 1] (RGB), any device/dtype, may carry an autograd graph.
        torch: the torch module.

    Returns:
        ``[B, 3, h, w]`` float32 pixel values, as the processor's ``pixel_values``.

    Raises:
        ValueError: images not ``[B, 3, H, W]``, or a processor setting this path does not implement (a resample
            filter other than bicubic/bilinear, a size without ``shortest_edge`` or ``height``/``width``).
    """
    F = torch.nn.functional
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"differentiable reward expects images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    x = images.float()
    ip = image_processor
    if getattr(ip, "do_resize", True):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = ip.size
        short_edge = _field(size, "shortest_edge")
        if short_edge:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = int(short_edge), int(int(short_edge) * long / short)
            out_hw = (new_long, new_short) if w <= h else (new_short, new_long)
        elif _field(size, "height") and _field(size, "width"):
            out_hw = (int(_field(size, "height")), int(_field(size, "width")))
        else:
            raise ValueError(f"differentiable CLIP preprocessing: unsupported processor size {size!r}")
        resample = int(getattr(ip, "resample", 3) if getattr(ip, "resample", None) is not None else 3)
        modes = {3: "bicubic", 2: "bilinear"}  # PIL.Image.Resampling.BICUBIC / BILINEAR
        if resample not in modes:
            raise ValueError(f"differentiable CLIP preprocessing: resample filter {resample} is not implemented "
                             "(bicubic or bilinear only)")
        if out_hw != (h, w):
            x = F.interpolate(x, size=out_hw, mode=modes[resample], align_corners=False, antialias=True)
    if getattr(ip, "do_center_crop", True):
        ch, cw = int(_field(ip.crop_size, "height")), int(_field(ip.crop_size, "width"))
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if ch > h or cw > w:  # the processor pads with zeros (of the 0-255 image) around a small image
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            x = F.pad(x, (math.ceil(pw / 2), pw - math.ceil(pw / 2), math.ceil(ph / 2), ph - math.ceil(ph / 2)))
            h, w = int(x.shape[-2]), int(x.shape[-1])
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    # images are uint8/255 in [0, 1]: the processor's 0-255 values times its rescale factor
    x = x * (255.0 * float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 255.0)
    if getattr(ip, "do_normalize", True):
        mean = torch.tensor(list(ip.image_mean), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(list(ip.image_std), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def _projected(out, torch):
    """The projected embedding from ``get_image_features``/``get_text_features``: a tensor in transformers 4, a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds it in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """A frozen ``CLIPModel`` + ``CLIPProcessor`` that returns unit-norm float32 embeddings.

    Args:
        model: hub id or local directory of the ``CLIPModel`` weights.
        processor: hub id or local directory of the ``CLIPProcessor`` (tokenizer + image processor); ``None`` =
            ``model``.
        device: torch device (``None``: this process's CUDA device if any, else CPU).
        dtype: weights/activations dtype (name or ``torch.dtype``); embeddings are returned in float32.
        reward: reward name used in error messages.

    Raises:
        ImportError: torch/transformers missing (message has the ``pip install`` line).
        OSError: ``model``/``processor`` is neither a local directory nor in the hub cache (offline) / hub.
        ValueError: unknown dtype.
    """

    def __init__(self, model: str, processor: str | None, device, dtype, reward: str):
        torch, transformers = import_torch_transformers(reward)
        self.torch, self.reward = torch, reward
        self.device, self.dtype = resolve_device(torch, device), resolve_dtype(torch, dtype)
        clip = transformers.CLIPModel.from_pretrained(model)
        # read before any cast: in bfloat16 the stored log-scale 4.6052 would round to 4.5938 (exp ≈ 98.9, not 100)
        self._logit_scale = float(clip.logit_scale.detach().double().exp())
        self.model = clip.to(self.device, self.dtype).eval().requires_grad_(False)
        proc = transformers.CLIPProcessor.from_pretrained(processor or model)
        self.image_processor, self.tokenizer = proc.image_processor, proc.tokenizer
        # CLIP truncates prompts at 77 tokens; never exceed the text tower's position table.
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint (100 for OpenAI CLIP and PickScore)."""
        return self._logit_scale

    def image_embeds(self, images: np.ndarray):
        """Unit-norm image embeddings, float32 ``[B, D]`` on the model's device, for uint8 images ``[B, H, W, 3]``
        (resized/cropped/normalised by the checkpoint's image processor)."""
        from PIL import Image

        torch = self.torch
        # PIL images: unambiguous channel layout (a numpy image 3 pixels high could be read as channels-first)
        pil = [Image.fromarray(np.ascontiguousarray(im)) for im in images]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            emb = _projected(out, torch).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def image_embeds_differentiable(self, images):
        """Unit-norm image embeddings, float32 ``[B, D]``, differentiable with respect to ``images``.

        ``images``: ``[B, 3, H, W]`` float in [0, 1] (any device; moved to the model's). Preprocessed in torch by
        :func:`torch_preprocess` (the processor's resize / centre crop / normalisation), so the result matches
        :meth:`image_embeds` of the same images rounded to uint8 up to the rounding. The model's own parameters
        stay frozen (``requires_grad=False``): gradients reach only the images.
        """
        torch = self.torch
        pixels = torch_preprocess(self.image_processor, images.to(self.device), torch)
        out = self.model.get_image_features(pixel_values=pixels.to(self.dtype))
        emb = _projected(out, torch).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: list[str]):
        """Unit-norm text embeddings, float32 ``[B, D]``; prompts longer than ``max_length`` tokens are truncated."""
        torch = self.torch
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device))
            emb = _projected(out, torch).float()
        return emb / emb.norm(dim=-1, keepdim=True)


class ClipPairScore:
    """Base of CLIPScore and PickScore: ``reward_i = exp(logit_scale) · cos(image_i, prompt_i) / divisor``.

    Subclasses set ``name``, ``divisor``, ``default_model`` and ``default_processor``. Columns returned: ``reward``
    and ``cosine`` (the raw cosine in ``[-1, 1]``), float32 ``[B]``. Differentiable (:meth:`differentiable`), so it
    can drive ``algorithm=draft``.
    """

    name = "clip_pair"
    divisor = 1.0
    default_model = ""
    default_processor: str | None = None

    def __init__(self, model: str | None = None, processor: str | None = None, device=None,
                 dtype="float32", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be ≥ 1 (got {batch_size})")
        self.batch_size = int(batch_size)
        model = model or self.default_model
        processor = processor or self.default_processor or model
        self.embedder = ClipEmbedder(model, processor, device, dtype, self.name)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None
                 ) -> dict[str, np.ndarray]:
        check_batch(images, prompts, self.name)
        cos = []
        for i in range(0, len(images), self.batch_size):
            img = self.embedder.image_embeds(images[i : i + self.batch_size])
            txt = self.embedder.text_embeds(prompts[i : i + self.batch_size])
            cos.append((img * txt).sum(-1).cpu().numpy())
        cosine = np.concatenate(cos).astype(np.float32) if cos else np.zeros(0, np.float32)
        reward = (self.embedder.logit_scale * cosine.astype(np.float64) / self.divisor).astype(np.float32)
        return {"reward": reward, "cosine": cosine}

    def differentiable(self, images, prompts: list[str], metadata: list[dict] | None = None):
        """The ``reward`` column as a differentiable function of the images (DRaFT / ReFL, :mod:`flowrl.draft`).

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1] with their autograd graph (e.g. decoded by the VAE).
            prompts: the B prompts; metadata is ignored.

        Returns:
            ``[B]`` float32 tensor on the images' device, ``exp(logit_scale)·cos(E_img, E_txt)/divisor`` — the same
            scale as ``__call__``'s ``reward`` (equal up to uint8 rounding), differentiable w.r.t. ``images``.
            Text embeddings are constants; the CLIP weights never receive gradients.

        Raises:
            ValueError: images not ``[B, 3, H, W]`` or a prompt count that differs from B.
        """
        torch = self.embedder.torch
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        parts = []
        for i in range(0, images.shape[0], self.batch_size):
            img = self.embedder.image_embeds_differentiable(images[i : i + self.batch_size])
            txt = self.embedder.text_embeds(prompts[i : i + self.batch_size]).clone()  # out of inference mode
            parts.append((img * txt).sum(-1))
        cos = torch.cat(parts) if parts else torch.zeros(0, device=self.embedder.device)
        return (self.embedder.logit_scale / self.divisor * cos).to(images.device)
