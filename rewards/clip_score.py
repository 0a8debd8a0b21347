"""CLIPScore reward: image-prompt agreement under OpenAI CLIP ViT-L/14.

CLIPScore (Hessel et al. 2021, arXiv 2104.08718) measures text-image agreement by the cosine of CLIP embeddings.
As a training reward (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470; ``shared/REFERENCE.md`` §7) it is CLIP's own
``logits_per_image`` for the matching pair divided by 30::

    reward = exp(logit_scale) · cos(E_img(image), E_txt(prompt)) / 30

With OpenAI's checkpoint ``exp(logit_scale) = 100``, so the range is ``[-10/3, 10/3]``; real image-prompt pairs
land around 0.6–1.2. Dependencies: torch and transformers only (flowrl's own); prompts are truncated at 77 tokens.
"""

from __future__ import annotations

from ._clip_common import ClipPairScore


class CLIPScore(ClipPairScore):
    """CLIPScore reward (``reward=clip_score``): ``exp(logit_scale)·cos(img, txt)/30`` per image-prompt pair.

    Args:
        model: hub id (default ``openai/clip-vit-large-patch14``, read from the local cache when
            ``HF_HUB_OFFLINE=1``) or a local directory holding a ``CLIPModel`` and its ``CLIPProcessor``.
        processor: where the processor lives if not beside the model (default: ``model``).
        device: torch device (default: this process's CUDA device if any, else CPU).
        dtype: float32 / float16 / bfloat16 (embeddings and scores are computed in float32 after the towers).
        batch_size: image-prompt pairs per forward pass (results do not depend on it).

    Call: ``images`` uint8 ``[B, H, W, 3]`` (any size; the processor resizes to 224), ``prompts`` (B strings);
    ``metadata`` is ignored. Returns ``reward`` float32 ``[B]`` in ``[-exp(logit_scale)/30, exp(logit_scale)/30]``
    and ``cosine`` float32 ``[B]`` in ``[-1, 1]``.

    Raises:
        ImportError: torch/transformers cannot be imported (the message has the ``pip install`` line).
        OSError: the model or processor cannot be found (offline and not cached, or a wrong path).
        ValueError: bad ``dtype``/``batch_size``; at call time images not uint8 ``[B, H, W, 3]`` or a prompt count
            that differs from B.
    """

    name = "clip_score"
    divisor = 30.0
    default_model = "openai/clip-vit-large-patch14"
    default_processor = None
