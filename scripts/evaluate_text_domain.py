"""Measure the text extension of the embedded domain (sign scenes with a quoted word, ``flowrl/shapes/text.py``).

    python scripts/evaluate_text_domain.py     # ~30 s on 2 cores; the figures quoted in assets/README.md

Prints, on one freshly rendered scene per held-out prompt (``assets/prompts/text_test.jsonl`` via
``make_text_splits``, scene seed 1): the ``ocr`` reward's exact-match rate on clean renders with text detection and
with recognition only (``reward=ocr_shapes``); the exact-match rate after encode → decode through
``assets/shapes-vae-text`` and through the shapes VAE; and the GenEval strict score of the 108 held-out shape scenes
after the text VAE's encode → decode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def roundtrip(vae, images: np.ndarray) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` → posterior-mean latents → decoded ``uint8 [N, H, W, 3]``."""
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def main() -> None:
    from diffusers import AutoencoderKL

    from flowrl.geneval.scoring import evaluate_strict
    from flowrl.shapes.detect import detect
    from flowrl.shapes.prompts import split_metadata
    from flowrl.shapes.render import render_scene, scene_for_metadata
    from flowrl.shapes.text import make_text_splits, render_text_scene, sign_for_metadata
    from flowrl_rewards.ocr import OCRReward

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--text-vae", default="assets/shapes-vae-text")
    p.add_argument("--shapes-vae", default="assets/shapes-sd3/vae")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    recs = make_text_splits()["test"]
    prompts = [r["prompt"] for r in recs]
    signs = np.stack([render_text_scene([sign_for_metadata(r, rng)]) for r in recs])
    ocr, fast = OCRReward(), OCRReward(use_det=False, use_cls=False)
    for name, reward in (("detection", ocr), ("recognition only", fast)):
        t0 = time.perf_counter()
        exact = reward(signs, prompts, recs)["exact"].mean()
        per_image = (time.perf_counter() - t0) / len(recs)
        print(f"clean, {name}: exact {exact:.3f} ({len(recs)} scenes), {per_image:.3f} s per image")
    text_vae, shapes_vae = AutoencoderKL.from_pretrained(a.text_vae), AutoencoderKL.from_pretrained(a.shapes_vae)
    for name, vae in (("text VAE", text_vae), ("shapes VAE", shapes_vae)):
        print(f"{name} encode → decode: exact {ocr(roundtrip(vae, signs), prompts, recs)['exact'].mean():.3f}")
    test = split_metadata()[1]
    shapes = np.stack([render_scene(scene_for_metadata(m, rng)) for m in test])
    strict = np.mean([evaluate_strict(m, detect(im))[0] for m, im in zip(test, roundtrip(text_vae, shapes))])
    print(f"shape scenes through the text VAE: GenEval strict {strict:.3f} ({len(test)} scenes)")


if __name__ == "__main__":
    main()
