"""PickScore reward: human-preference score of a CLIP-H model fine-tuned on Pick-a-Pic.

PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569) is the scaled cosine of a fine-tuned CLIP ViT-H/14
(weights ``yuvalkirstain/PickScore_v1``; tokenizer and image processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
Flow-GRPO (arXiv 2505.05470) divides it by 26 to bring it near ``[0, 1]`` (``shared/REFERENCE.md`` §7)::

    reward = exp(logit_scale) · cos(E_img(image), E_txt(prompt)) / 26

PickScore's ``exp(logit_scale)`` is 100, so the range is ``[-100/26, 100/26]``; generated images typically score
20–23 before the division (0.77–0.88 after). Dependencies: torch and transformers only.
"""

from __future__ import annotations

from ._clip_common import ClipPairScore


class PickScore(ClipPairScore):
    """PickScore reward (``reward=pickscore``): ``exp(logit_scale)·cos(img, txt)/26`` per image-prompt pair.

    Args:
        model: hub id (default ``yuvalkirstain/PickScore_v1``) or local directory of the ``CLIPModel`` weights.
        processor: hub id (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) or local directory of the
            ``CLIPProcessor``; PickScore's own repository ships no processor.
        device: torch device (default: this process's CUDA device if any, else CPU).
        dtype: float32 / float16 / bfloat16.
        batch_size: image-prompt pairs per forward pass (results do not depend on it).

    Call: ``images`` uint8 ``[B, H, W, 3]``, ``prompts`` (B strings, truncated at 77 tokens); ``metadata`` is
    ignored. Returns ``reward`` float32 ``[B]`` in ``[-exp(logit_scale)/26, exp(logit_scale)/26]`` and ``cosine``
    float32 ``[B]`` in ``[-1, 1]``.

    Raises:
        ImportError: torch/transformers cannot be imported (the message has the ``pip install`` line).
        OSError: the model or processor cannot be found (offline and not cached, or a wrong path).
        ValueError: bad ``dtype``/``batch_size``; at call time images not uint8 ``[B, H, W, 3]`` or a prompt count
            that differs from B.
    """

    name = "pickscore"
    divisor = 26.0
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
