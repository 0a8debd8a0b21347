"""JPEG (in)compressibility rewards (DDPO, Black et al. 2023, arXiv 2305.13301, §6.1 "Compressibility").

The image is encoded as JPEG at quality 95 with Pillow; its size ``s`` in kB (10³ bytes) gives
``reward = -s / scale`` for compressibility and ``+s / scale`` for incompressibility (``scale = 500`` puts a 512×512
image near ``[-1, 0]``; ``shared/REFERENCE.md`` §7). No model, no extra dependency.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """Size in kB (10³ bytes) of ``image`` (uint8 ``[H, W, 3]``) encoded as JPEG at ``quality``.

    Raises:
        ValueError: not a uint8 ``[H, W, 3]`` array.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegCompressibility:
    """``reward = -jpeg_size_kb / scale`` (smaller files score higher). Columns: ``reward``, ``jpeg_kb``."""

    name = "jpeg_compressibility"
    sign = -1.0

    def __init__(self, quality: int = 95, scale: float = 500.0):
        if not 1 <= quality <= 100 or scale <= 0:
            raise ValueError(f"quality must be in [1, 100] and scale > 0 (got {quality}, {scale})")
        self.quality, self.scale = quality, scale

    def __call__(self, images: np.ndarray, prompts: list[str], metadata=None) -> dict[str, np.ndarray]:
        kb = np.array([jpeg_size_kb(im, self.quality) for im in images], dtype=np.float32)
        return {"reward": self.sign * kb / self.scale, "jpeg_kb": kb}


class JpegIncompressibility(JpegCompressibility):
    """``reward = +jpeg_size_kb / scale`` (larger files score higher). Columns: ``reward``, ``jpeg_kb``."""

    name = "jpeg_incompressibility"
    sign = 1.0
