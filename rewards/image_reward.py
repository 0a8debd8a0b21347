"""ImageReward reward (Xu et al. 2023, "ImageReward", arXiv 2304.05977).

ImageReward is a BLIP ViT-L image encoder cross-attended by a BERT text encoder whose [CLS] feature goes through an
MLP trained on 137k expert preference comparisons; the output is standardised with the training set's mean and
standard deviation, so scores are roughly N(0, 1) over generated images (good images ≳ 1, failures ≲ -1). It is
used through its own package (``import ImageReward``; ``ImageReward.load("ImageReward-v1.0")``, weights from the hub
repository ``THUDM/ImageReward``) as Flow-GRPO does: one ``inference_rank(prompt, [image])`` per image, whose reward
equals ``score(prompt, image)`` (``shared/REFERENCE.md`` §7).

Dependencies: the ``image-reward`` 1.5 package, which imports helpers that transformers 4.56+ no longer exports
from ``transformers.modeling_utils`` (so it fails with flowrl's transformers 5), OpenAI's ``clip`` package
(``openai-clip``, which needs ``pkg_resources``, gone from setuptools 82), timm 0.6.13, fairscale and torchvision.
The supported route is a separate virtual environment serving this reward with
``python -m flowrl.reward_server --reward imagereward`` and training with ``reward=remote``; the ImportError raised
here spells out the commands.
"""

from __future__ import annotations

import numpy as np

from ._deps import IMPORT_FAILURES, remote_route

IMAGEREWARD_PIP = 'pip install image-reward==1.5 openai-clip "transformers>=4.51,<4.56" "setuptools<82" torchvision'
IMAGEREWARD_PORT = 18088


def import_image_reward():
    """The ``ImageReward`` package, or ImportError with the separate-venv + reward-server route.

    Raises:
        ImportError: ``import ImageReward`` fails (not installed, or broken by transformers/torchvision/setuptools
            versions). The message contains :data:`IMAGEREWARD_PIP` verbatim and the commands.
    """
    try:
        import ImageReward

        return ImageReward
    except IMPORT_FAILURES as e:
        raise ImportError(
            f"reward 'imagereward' needs the ImageReward package, which this environment cannot import "
            f"({type(e).__name__}: {e}). image-reward 1.5 imports helpers that transformers 4.56+ no longer exports "
            f"(it fails with transformers 5) and needs torchvision and OpenAI's clip package, so install it in a "
            f"virtual environment of its own with `{IMAGEREWARD_PIP}`. "
            f"{remote_route('imagereward', '.venv-imagereward', IMAGEREWARD_PIP, IMAGEREWARD_PORT)}"
        ) from e


class ImageRewardScore:
    """ImageReward reward (``reward=imagereward``): the BLIP-based preference model's standardised score.

    Args:
        model: ``"ImageReward-v1.0"`` (downloaded from the hub repository ``THUDM/ImageReward`` into
            ``download_root``) or a path to an ImageReward checkpoint.
        device: torch device string (default: ``"cuda"`` if available, else ``"cpu"``).
        download_root: where ImageReward keeps its files (its default: ``~/.cache/ImageReward``).
        med_config: path of BLIP's ``med_config.json`` (default: downloaded beside the checkpoint).

    Call: ``images`` uint8 ``[B, H, W, 3]``, ``prompts`` (B strings); metadata ignored. Returns ``reward`` float32
    ``[B]``, unbounded (standardised: about N(0, 1) over generated images).

    Raises:
        ImportError: ``ImageReward`` cannot be imported — the message gives the exact ``pip install`` line and the
            separate-venv + ``python -m flowrl.reward_server --reward imagereward`` route.
        ValueError: images not uint8 ``[B, H, W, 3]`` or a prompt count that differs from B.
    """

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", device: str | None = None, download_root: str | None = None,
                 med_config: str | None = None):
        rm = import_image_reward()
        import torch

        self.torch = torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = rm.load(model, device=device, download_root=download_root, med_config=med_config)
        self.model.eval().requires_grad_(False)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None
                 ) -> dict[str, np.ndarray]:
        from PIL import Image

        from ._clip_common import check_batch

        check_batch(images, prompts, self.name)
        out = np.zeros(len(images), dtype=np.float32)
        with self.torch.no_grad():
            for i, (img, prompt) in enumerate(zip(images, prompts)):
                _, rewards = self.model.inference_rank(prompt, [Image.fromarray(np.ascontiguousarray(img))])
                out[i] = float(np.ravel(rewards)[0])
        return {"reward": out}
