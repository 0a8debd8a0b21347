"""Fidelity of a trained VAE on the shapes domain: the fraction of fresh scenes whose reconstruction is scored
GenEval-correct against the scene's own metadata by the shapes detector (and the same for the originals).

    python scripts/vae_fidelity.py runs/pretrain/vae --n 300
"""

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL

from flowrl.geneval.scoring import evaluate_strict
from flowrl.shapes.detect import detect
from flowrl.shapes.prompts import sample_caption
from flowrl.shapes.render import render_scene, scene_for_metadata


@torch.no_grad()
def fidelity(vae_dir: str, n: int = 300, seed: int = 123) -> dict:
    """Returns ``{"original": frac_correct, "reconstruction": frac_correct, "mse": mean squared error in [0,1]²}``."""
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    rng = np.random.default_rng(seed)
    mds = [sample_caption(rng) for _ in range(n)]
    imgs = np.stack([render_scene(scene_for_metadata(m, rng)) for m in mds])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample for i in range(0, n, 64)])
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    ok_o = np.mean([evaluate_strict(m, detect(im))[0] for m, im in zip(mds, imgs)])
    ok_r = np.mean([evaluate_strict(m, detect(im))[0] for m, im in zip(mds, rec_u8)])
    return {"original": float(ok_o), "reconstruction": float(ok_r),
            "mse": float(((rec.clamp(-1, 1) - x) / 2).pow(2).mean())}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("vae_dir")
    p.add_argument("--n", type=int, default=300)
    a = p.parse_args()
    print(fidelity(a.vae_dir, a.n))
