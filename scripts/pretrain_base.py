"""Pretrain the embedded default model: a tiny Stable Diffusion 3 pipeline for the "shapes" domain.

Stages (run in order; each is reproducible from ``--seed`` and writes into ``--work-dir``):

1. ``vae``: a tiny ``AutoencoderKL`` (64×64×3 ↔ 16×16×4) trained on rendered scenes with an object-weighted
   L1 + MSE loss and a small KL term; then its latent ``shift_factor`` / ``scaling_factor`` are measured.
2. ``transformer``: an ``SD3Transformer2DModel`` (MMDiT) and two CLIP text encoders trained jointly with the
   rectified-flow objective (SD3: logit-normal σ, velocity target ``ε - x0``) on captioned scenes, with 10 %
   caption dropout (for CFG), a cosine learning-rate schedule and EMA weights.
3. ``assemble``: writes the diffusers folder (``model_index.json`` + components) that
   ``StableDiffusion3Pipeline.from_pretrained(path)`` loads, from the VAE and the EMA transformer/text encoders.

Run (the committed ``assets/shapes-sd3`` is exactly this, seed 0, default arguments; times measured on 2 CPU cores
with other work running beside it)::

    python scripts/pretrain_base.py --stage vae          # 3,500 steps of 16: 47 min (≈35 min on idle cores)
    python scripts/pretrain_base.py --stage transformer  # 40k-scene latent pool (4 min) + 5,000 steps of 64: ≈45 min
    python scripts/pretrain_base.py --stage assemble --out assets/shapes-sd3

Needs ``pip install --no-deps open_clip_torch`` for the CLIP BPE vocabulary (see flowrl/models/clip_tokenizer.py).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowrl.shapes.prompts import sample_caption
from flowrl.models.tiny_sd3 import (CHAR_T5_LENGTH, T5_LENGTHS, T5_PROBS, VAE_CONFIG, build_pipeline, char_t5,
                                     t5_stub)
from flowrl.shapes.render import BACKGROUND, render_scene, scene_for_metadata
from flowrl.shapes.text import make_text_splits, sample_text_caption


@functools.lru_cache(maxsize=1)
def _text_pretrain_records() -> list[dict]:
    return make_text_splits()["pretrain"]


def scene_batch(rng: np.random.Generator, n: int, text_fraction: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """``n`` random captioned scenes: images ``[n, 3, 64, 64]`` in [-1, 1] and their captions. With
    ``text_fraction`` > 0, that fraction (in expectation) are text scenes (:mod:`flowrl.shapes.text`) captioned by the
    pretraining split of the OCR prompts."""
    imgs, caps = [], []
    for _ in range(n):
        if text_fraction > 0 and rng.random() < text_fraction:
            img, cap = sample_text_caption(rng, _text_pretrain_records())
            imgs.append(img)
            caps.append(cap)
            continue
        md = sample_caption(rng)
        imgs.append(render_scene(scene_for_metadata(md, rng)))
        caps.append(md["prompt"])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps


def train_vae(args) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae_init) if args.vae_init else AutoencoderKL(**VAE_CONFIG)
    print(f"VAE parameters: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.vae_steps))))
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1) / 127.5 - 1
    out = Path(args.work_dir) / "vae"
    t0 = time.time()
    last = min(args.vae_steps, args.stop_after or args.vae_steps)
    for step in range(1, last + 1):
        x, _ = scene_batch(rng, args.vae_batch, args.text_fraction)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        # Objects cover ~10 % of the pixels; weight them (and their anti-aliased edges) 5× so shapes train first.
        w = 1 + 4 * ((x - bg).abs().amax(1, keepdim=True) > 0.02).float()
        if args.edge_weight:  # text strokes: weight pixels that differ from their 3×3 neighbourhood mean
            edge = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().amax(1, keepdim=True) > 0.05
            w = w + args.edge_weight * edge.float()
        err = rec - x
        loss_rec = (w * (err.abs() + err.square())).mean()
        loss_kl = post.kl().mean() / x[0].numel()
        loss = loss_rec + args.vae_kl * loss_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"vae step {step}/{args.vae_steps} loss {loss_rec.item():.4f} kl {loss_kl.item():.3f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % 500 == 0 or step == last:
            vae.save_pretrained(out)
    shift, scale = latent_statistics(vae, rng, args.text_fraction)
    vae.save_pretrained(out)
    print(f"VAE done in {time.time() - t0:.0f}s; shift_factor {shift:.4f} scaling_factor {scale:.4f}", flush=True)


@torch.no_grad()
def latent_statistics(vae, rng: np.random.Generator, text_fraction: float = 0.0) -> tuple[float, float]:
    """Measure SD3-style ``shift_factor`` / ``scaling_factor`` on 512 fresh scenes, so that ``(z - shift) * scale``
    has zero mean and unit variance, and write them into ``vae.config``. Returns ``(shift, scale)``."""
    zs = torch.cat([vae.encode(scene_batch(rng, 64, text_fraction)[0]).latent_dist.mean for _ in range(8)])
    shift, scale = zs.mean().item(), 1.0 / zs.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


@torch.no_grad()
def latent_pool(vae, rng: np.random.Generator, n: int, batch: int = 256,
                text_fraction: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Encode ``n`` captioned scenes once: normalised latents ``[n, 4, 16, 16]`` (posterior mean) and captions."""
    zs, caps = [], []
    for i in range(0, n, batch):
        x, c = scene_batch(rng, min(batch, n - i), text_fraction)
        z = vae.encode(x).latent_dist.mean
        zs.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
        caps += c
        if (i // batch) % 40 == 0:
            print(f"encoded {i + len(c)}/{n}", flush=True)
    return torch.cat(zs), caps


def _sample(pipe, chunk: list[dict], seed: int, steps: int, cfg: float, max_sequence_length: int) -> np.ndarray:
    """One ODE image per record (``float [n, 64, 64, 3]`` in [0, 1]); record ``k`` uses seed ``seed + k``."""
    gens = [torch.Generator().manual_seed(seed + k) for k in range(len(chunk))]
    return pipe([m["prompt"] for m in chunk], num_inference_steps=steps, guidance_scale=cfg, generator=gens,
                height=64, width=64, max_sequence_length=max_sequence_length, output_type="np").images


def quick_eval(pipe, metadata: list[dict], steps: int = 20, cfg: float = 4.5, seed: int = 0,
               max_sequence_length: int = 0) -> dict:
    """Held-out GenEval-style strict score of the current weights (1 image per prompt, ODE sampler)."""
    from flowrl.geneval.scoring import evaluate_strict, partial_credit, score_records
    from flowrl.shapes.detect import detect

    recs = []
    for i in range(0, len(metadata), 32):
        chunk = metadata[i : i + 32]
        imgs = _sample(pipe, chunk, seed + i, steps, cfg, max_sequence_length)
        for m, im in zip(chunk, imgs):
            dets = detect((im * 255).round().astype(np.uint8))
            recs.append({"prompt": m["prompt"], "tag": m["tag"], "correct": evaluate_strict(m, dets)[0],
                         "partial": partial_credit(m, dets)})
    return score_records(recs)


def quick_ocr_eval(pipe, metadata: list[dict], steps: int = 20, cfg: float = 4.5, seed: int = 0,
                   max_sequence_length: int = 0) -> dict:
    """Held-out OCR accuracy of the current weights (1 image per prompt, ODE sampler, the ``ocr`` reward with
    detection): mean reward and exact-match rate per tag."""
    from flowrl_rewards.ocr import OCRReward

    ocr, rows = OCRReward(), []
    for i in range(0, len(metadata), 32):
        chunk = metadata[i : i + 32]
        imgs = _sample(pipe, chunk, seed + i, steps, cfg, max_sequence_length)
        out = ocr((imgs * 255).round().astype(np.uint8), [m["prompt"] for m in chunk], chunk)
        rows += [(m["tag"], r, e) for m, r, e in zip(chunk, out["reward"], out["exact"])]
    res = {}
    for tag in sorted({r[0] for r in rows}) + ["overall"]:
        sel = [r for r in rows if tag in ("overall", r[0])]
        res[tag] = {"reward": round(float(np.mean([r[1] for r in sel])), 3),
                    "exact": round(float(np.mean([r[2] for r in sel])), 3)}
    return res


def train_transformer(args) -> None:
    from flowrl.shapes.prompts import split_metadata

    work = Path(args.work_dir)
    pipe = build_pipeline(work / "vae", work / "tokenizer", args.seed)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    names = ["transformer", "text_encoder", "text_encoder_2"]
    n_seq = CHAR_T5_LENGTH if args.char_t5 else None  # T5-slot tokens: the character encoder's, else random zeros
    if args.char_t5:  # a trainable character-level encoder in the T5 slot (flowrl.models.tiny_sd3.char_t5)
        t5, t5_tok = char_t5(work / "tokenizer_3_char", args.seed)
        pipe.register_modules(text_encoder_3=t5, tokenizer_3=t5_tok)
        names.append("text_encoder_3")
    modules = torch.nn.ModuleList([getattr(pipe, n) for n in names])
    if args.init_from:  # continued pretraining: start from a saved pipeline's (EMA) weights, fresh optimizer/schedule
        init = _load(Path(args.init_from), t5=_has_char_t5(Path(args.init_from)))
        for name in names:
            if getattr(init, name, None) is not None:
                getattr(pipe, name).load_state_dict(getattr(init, name).state_dict())
                print(f"initialised {name} from {args.init_from}", flush=True)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"transformer parameters: {n_params / 1e6:.2f} M", flush=True)
    rng = np.random.default_rng(args.seed + 1)
    cache = work / f"latent_pool_{args.pool}_seed{args.seed}.pt"
    if cache.is_file():  # the pool depends only on the VAE, the seed and the size
        z_all, caps_all = torch.load(cache)
    else:
        z_all, caps_all = latent_pool(pipe.vae, rng, args.pool)
        torch.save((z_all, caps_all), cache)
    n_shapes = len(caps_all)
    if args.text_fraction > 0:  # a second pool of text scenes, drawn with probability --text-fraction
        cache = work / f"latent_pool_text_{args.text_pool}_seed{args.seed}.pt"
        if cache.is_file():
            z_text, caps_text = torch.load(cache)
        else:
            z_text, caps_text = latent_pool(pipe.vae, np.random.default_rng(args.seed + 4), args.text_pool,
                                            text_fraction=1.0)
            torch.save((z_text, caps_text), cache)
        z_all, caps_all = torch.cat([z_all, z_text]), caps_all + caps_text
    text_test = make_text_splits()["test"] if args.text_fraction > 0 else None
    rng = np.random.default_rng(args.seed + 3)  # training-loop randomness, independent of whether the pool was cached
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    total = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    _, held_out = split_metadata()
    gen = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.time()
    last = min(total, args.stop_after or total)
    for step in range(1, last + 1):
        idx = torch.randint(n_shapes, (args.batch,), generator=gen)
        if args.text_fraction > 0:
            is_text = torch.rand(args.batch, generator=gen) < args.text_fraction
            idx_text = n_shapes + torch.randint(len(caps_all) - n_shapes, (args.batch,), generator=gen)
            idx = torch.where(is_text, idx_text, idx)
        x0 = z_all[idx]
        caps = ["" if rng.random() < args.caption_dropout else caps_all[i] for i in idx.tolist()]
        n_t5 = n_seq if n_seq is not None else int(rng.choice(T5_LENGTHS, p=T5_PROBS))
        emb, _, pooled, _ = pipe.encode_prompt(prompt=caps, prompt_2=None, prompt_3=None,
                                               do_classifier_free_guidance=False, max_sequence_length=n_t5)
        u = torch.sigmoid(torch.randn(args.batch, generator=gen))
        sigma = args.sigma_shift * u / (1 + (args.sigma_shift - 1) * u)  # logit-normal σ, shifted (SD3: shift 3)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        v = pipe.transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb,
                             pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            print(f"step {step}/{total} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == last:
            save_ema(pipe, ema, modules, work / "ema")
            try:
                ema_pipe = _load(work / "ema", t5=args.char_t5)
                seq = n_seq or 0
                evaluation = quick_eval(ema_pipe, held_out, max_sequence_length=seq)
                print(f"eval step {step}: " + json.dumps(evaluation), flush=True)
                if text_test is not None:
                    print(f"ocr eval step {step}: " + json.dumps(quick_ocr_eval(ema_pipe, text_test,
                                                                                 max_sequence_length=seq)), flush=True)
            except ImportError as e:  # the detector may not exist yet while the package is being built
                print(f"eval skipped: {e}", flush=True)
    print(f"transformer done in {time.time() - t0:.0f}s", flush=True)


def save_ema(pipe, ema, modules, out: Path) -> None:
    """Save the pipeline (with the T5 stub) with EMA weights swapped in (training weights restored afterwards)."""
    from diffusers import StableDiffusion3Pipeline

    backup = [p.detach().clone() for p in modules.parameters()]
    with torch.no_grad():
        for p, pe in zip(modules.parameters(), ema.parameters()):
            p.copy_(pe)
    comps = dict(pipe.components)
    if comps.get("text_encoder_3") is None:  # no trained T5-slot encoder: the zero-output stub (see tiny_sd3)
        t5, t5_tok = t5_stub(out.parent / "tokenizer_3")
        comps.update(text_encoder_3=t5, tokenizer_3=t5_tok)
    StableDiffusion3Pipeline(**comps).save_pretrained(out)
    with torch.no_grad():
        for p, b in zip(modules.parameters(), backup):
            p.copy_(b)


def _has_char_t5(path: Path) -> bool:
    """Whether the pipeline folder's T5 slot holds a character-level encoder (``char_t5``), not the zero stub."""
    cfg = path / "text_encoder_3" / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("num_layers", 1) > 1


def _load(path: Path, t5: bool = False):
    from diffusers import StableDiffusion3Pipeline

    pipe = (StableDiffusion3Pipeline.from_pretrained(path) if t5 else
            StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assemble(args) -> None:
    """Copy the EMA pipeline into ``--out`` (as the bare ``from_pretrained(path)`` call loads it) and print its size."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(Path(args.work_dir) / "ema")
    pipe.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "transformer", "assemble"], required=True)
    p.add_argument("--work-dir", default="runs/pretrain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=3500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--vae-init", default=None, help="fine-tune this AutoencoderKL folder instead of a fresh VAE")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="extra reconstruction weight on edge pixels (text strokes); 0 = the original loss")
    p.add_argument("--text-fraction", type=float, default=0.0,
                   help="fraction of text scenes (signs with a word, flowrl.shapes.text) in VAE and transformer data")
    p.add_argument("--pool", type=int, default=40_000, help="number of pre-encoded scenes")
    p.add_argument("--char-t5", action="store_true",
                   help="train a character-level encoder in the T5 slot (letters of quoted words, for text rendering)")
    p.add_argument("--sigma-shift", type=float, default=3.0,
                   help="shift of the logit-normal σ (3 = the sampling schedule's; 1 = more samples at mid/low σ)")
    p.add_argument("--text-pool", type=int, default=20_000, help="number of pre-encoded text scenes")
    p.add_argument("--steps", type=int, default=5_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--init-from", default=None,
                   help="continue from this pipeline folder's transformer/text encoders (e.g. assets/shapes-sd3)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end after this step (the learning-rate schedule is still the one of --steps / --vae-steps)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--out", default="assets/shapes-sd3")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"vae": train_vae, "transformer": train_transformer, "assemble": assemble}[args.stage](args)


if __name__ == "__main__":
    main()
