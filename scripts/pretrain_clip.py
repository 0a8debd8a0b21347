"""Pretrain the embedded CLIP model (``assets/shapes-clip``) on the "shapes" domain.

A tiny ``transformers.CLIPModel`` (CLIP: Radford et al. 2021, arXiv 2103.00020) is trained from random weights on
freshly rendered 64×64 scenes and their GenEval-style captions with CLIP's symmetric InfoNCE loss, made
composition-aware with NegCLIP-style hard-negative captions (Yuksekgonul et al. 2023, arXiv 2210.01936): every image
also sees ``--negatives`` captions of its own template with one attribute changed (shape, colour, count, relation,
argument order, or the two objects' colours swapped; :func:`flowrl.shapes.captions.hard_negatives`), so that a bag of
words cannot solve the task.

Data: every step renders ``--batch`` new scenes from the *training* split of the domain's prompts
(``assets/prompts/shapes_train.jsonl``: five tasks, uniform over tasks). No held-out prompt string
(``assets/prompts/shapes_test.jsonl``) is ever fed to the model, neither as a caption nor as a negative; as all four
``single_object`` prompts are held out, single-object scenes are seen only with their colour named (``colors``
task), and ``single_object`` captions are a true zero-shot test. Images get mild blur/noise augmentation (robustness
to generated images). Truth is computed from the scenes: a caption of another image of the batch that is also
true of an image (a duplicate prompt, or "a circle and a square" for a "circle left of a square" scene) is left out
of that image's softmax instead of counting as a negative.

Run (the committed ``assets/shapes-clip`` is exactly this, seed 0, default arguments; 1 CPU thread)::

    python scripts/pretrain_clip.py     # 3,400 steps × 64 scenes: 30.5 min on 2 shared cores; writes assets/shapes-clip
    python scripts/evaluate_clip.py                     # zero-shot accuracy on held-out prompts

Output folder: ``CLIPModel.save_pretrained`` (fp32 safetensors) + ``CLIPProcessor`` (the real CLIP BPE tokenizer of
``assets/shapes-sd3/tokenizer``, max 32 tokens, and a ``CLIPImageProcessor`` for 64×64 input, mean 0.5, std 0.125).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.125, 0.125, 0.125)
MAX_TOKENS = 32


def clip_config(args):
    """The tiny ``CLIPConfig``: ViT 64×64 / 8×8 patches, text tower over CLIP's 49,408-token BPE vocabulary."""
    from transformers import CLIPConfig

    from flowrl.models.clip_tokenizer import CLIP_VOCAB_SIZE

    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=args.text_width, intermediate_size=4 * args.text_width,
                num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
                max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(image_size=64, patch_size=8, num_channels=3, hidden_size=args.vision_width,
                  intermediate_size=4 * args.vision_width, num_hidden_layers=args.vision_layers,
                  num_attention_heads=args.vision_heads, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.proj_dim,
                      logit_scale_init_value=math.log(1 / 0.07))


def make_processor(tokenizer_dir: str | Path):
    """``CLIPProcessor`` = the CLIP BPE tokenizer (``model_max_length`` 32) + a slow ``CLIPImageProcessor`` that maps
    any image to 64×64 (shortest edge 64, centre crop 64, bicubic) normalised with :data:`IMAGE_MEAN`/:data:`IMAGE_STD`
    (the domain's pixel statistics, rounded)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_TOKENS)
    ip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                            image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return CLIPProcessor(image_processor=ip, tokenizer=tok)


def save_processor(processor, out: Path) -> None:
    """``processor.save_pretrained(out)``, then the tokenizer stored as CLIP's own ``vocab.json`` + ``merges.txt``
    (1.5 MB) instead of the 3.6 MB ``tokenizer.json``; checks that the reloaded tokenizer encodes every domain prompt
    exactly as before.

    Raises:
        RuntimeError: if the slim files tokenize any prompt differently.
    """
    from transformers import CLIPProcessor

    from flowrl.shapes.prompts import all_metadata

    processor.save_pretrained(out)
    tj = out / "tokenizer.json"
    model = json.loads(tj.read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tj.unlink()
    prompts = [m["prompt"] for m in all_metadata()] + ["", "A Photo of 3 STARS, left-of a Circle!"]
    reloaded = CLIPProcessor.from_pretrained(out).tokenizer
    if reloaded(prompts)["input_ids"] != processor.tokenizer(prompts)["input_ids"]:
        raise RuntimeError(f"the slim tokenizer files in {out} do not reproduce the tokenizer")


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, 64, 64, 3]`` (or float in [0, 255]) → normalised float ``[B, 3, 64, 64]``, exactly what the saved
    processor produces for 64×64 input."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) / 255.0
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Mild corruption so the model tolerates generated images: with probability ``p`` per image, a 3×3 blur blended
    in with a random weight in [0, 1] and Gaussian pixel noise of std ∈ [0, 8] (0–255 scale). Returns float32
    ``[B, H, W, 3]`` in [0, 255]."""
    x = images.astype(np.float32)
    for i in np.flatnonzero(rng.random(len(x)) < p):
        pad = np.pad(x[i], ((1, 1), (1, 1), (0, 0)), mode="edge")
        blur = sum(pad[dy : dy + x.shape[1], dx : dx + x.shape[2]] for dy in range(3) for dx in range(3)) / 9
        w = rng.random()
        x[i] = (1 - w) * x[i] + w * blur + rng.normal(0, rng.uniform(0, 8), x[i].shape)
    return np.clip(x, 0, 255)


def sample_batch(rng: np.random.Generator, pool: list[dict], n: int, k: int, exclude: frozenset[str]):
    """``n`` fresh captioned scenes with up to ``k`` hard negatives each.

    Args:
        pool: metadata records to caption from (drawn uniformly over tasks, then uniformly within the task).
        k: negatives per image, drawn kind-balanced (a kind uniformly, then a record of it) without repetition,
            excluding records true of the scene and prompts in ``exclude``.

    Returns:
        ``(images uint8 [n, 64, 64, 3], scenes, captions: list[record], negatives: list[list[record]])``.
    """
    from flowrl.shapes.captions import hard_negatives
    from flowrl.shapes.prompts import sample_caption
    from flowrl.shapes.render import render_scene, scene_for_metadata

    imgs, scenes, caps, negs = [], [], [], []
    for _ in range(n):
        md = sample_caption(rng, pool)
        objs = scene_for_metadata(md, rng)
        by_kind = {kd: list(v) for kd, v in hard_negatives(md, objs, exclude).items() if v}
        chosen = []
        while by_kind and len(chosen) < k:
            kd = list(by_kind)[rng.integers(len(by_kind))]
            chosen.append(by_kind[kd].pop(rng.integers(len(by_kind[kd]))))
            if not by_kind[kd]:
                del by_kind[kd]
        imgs.append(render_scene(objs))
        scenes.append(objs)
        caps.append(md)
        negs.append(chosen)
    return np.stack(imgs), scenes, caps, negs


def truth_matrix(scenes, records) -> torch.Tensor:
    """``bool [len(scenes), len(records)]``: record ``j`` is a true caption of scene ``i``
    (:func:`flowrl.shapes.captions.caption_holds`, with a fast necessary check on the classes present)."""
    from flowrl.shapes.captions import caption_holds

    need = [{e["class"] for e in r["include"]} for r in records]
    out = torch.zeros(len(scenes), len(records), dtype=torch.bool)
    for i, objs in enumerate(scenes):
        have = {o.shape for o in objs}
        for j, r in enumerate(records):
            if need[j] <= have and caption_holds(r, objs):
                out[i, j] = True
    return out


def embed_images(model, pix: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected image embeddings ``[B, D]``."""
    out = model.get_image_features(pixel_values=pix)
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(emb, dim=-1)


def embed_texts(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Unit-norm projected text embeddings ``[T, D]`` (prompts padded to the longest, ≤ 32 tokens)."""
    tok = tokenizer(prompts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    out = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(emb, dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, truth: torch.Tensor,
                     caption_col: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CLIP's symmetric InfoNCE with appended hard negatives and false negatives removed.

    Args:
        img: unit image embeddings ``[B, D]``; txt: unit embeddings ``[U, D]`` of the unique texts of the batch (the
            ``B`` captions and every image's hard negatives, deduplicated).
        scale: ``exp(logit_scale)`` (scalar tensor).
        truth: ``bool [B, U]``, which texts are true of which image (always true at ``(i, caption_col[i])``).
        caption_col: ``long [B]``, the column of image ``i``'s own caption.

    Image→text: for each image, cross-entropy of its own caption against every *false* text of the batch (the
    other images' captions and all hard negatives; NegCLIP adds the hard negatives to the in-batch ones). Text→image:
    for each image's caption, cross-entropy of its image against the images it is false of. Other texts that are
    also true of an image (a duplicate prompt, "a circle and a square" for a "circle left of a square" scene) are
    left out of its softmax — neither positive nor negative — so a generic true caption cannot stand in for the
    specific one. Returns ``(mean of the two directions, {"i2t", "t2i", "acc"})`` where ``acc`` is the fraction of
    images whose own caption beats every false text.
    """
    b = len(img)
    rows = torch.arange(b)
    logits = scale * img @ txt.T  # [B, U]
    neg_inf = torch.finfo(logits.dtype).min
    other_true = truth.clone()
    other_true[rows, caption_col] = False
    li = logits.masked_fill(other_true, neg_inf)
    i2t = F.cross_entropy(li, caption_col)
    lt = logits[:, caption_col].T  # [B captions, B images]
    tt = truth[:, caption_col].T & ~torch.eye(b, dtype=torch.bool)
    t2i = F.cross_entropy(lt.masked_fill(tt, neg_inf), rows)
    acc = (li.argmax(1) == caption_col).float().mean()
    return 0.5 * (i2t + t2i), {"i2t": i2t.item(), "t2i": t2i.item(), "acc": acc.item()}


@torch.no_grad()
def hard_negative_accuracy(model, tokenizer, images: np.ndarray, captions: list[dict], scenes,
                           exclude: frozenset[str] = frozenset()) -> dict[str, float]:
    """Fraction of images whose own caption scores above all its (false) hard negatives (none in ``exclude``):
    ``{"overall": acc, <tag>: acc, ...}``."""
    from flowrl.shapes.captions import hard_negatives

    img = embed_images(model, pixels(images))
    hits: dict[str, list[int]] = {}
    for i, (md, objs) in enumerate(zip(captions, scenes)):
        cands = [md["prompt"]] + [r["prompt"] for v in hard_negatives(md, objs, exclude).values() for r in v]
        hits.setdefault(md["tag"], []).append(int((embed_texts(model, tokenizer, cands) @ img[i]).argmax().item() == 0))
    out = {"overall": float(np.mean([h for v in hits.values() for h in v]))}
    return out | {t: float(np.mean(v)) for t, v in hits.items()}


def train(args) -> None:
    from transformers import CLIPModel

    from flowrl.shapes.captions import held_out_prompts, record
    from flowrl.shapes.prompts import read_jsonl, sample_caption
    from flowrl.shapes.render import render_scene, scene_for_metadata

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "train.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    torch.manual_seed(args.seed)
    exclude = held_out_prompts()
    pool = [m for m in read_jsonl(ROOT / "assets/prompts/shapes_train.jsonl") if m["prompt"] not in exclude]
    log(f"args: {json.dumps(vars(args))}")
    log(f"training prompts: {len(pool)} (held-out prompts excluded: {len(exclude)})")
    processor = make_processor(ROOT / args.tokenizer)
    tokenizer = processor.tokenizer
    model = CLIPModel(clip_config(args))
    n_par = sum(p.numel() for p in model.parameters())
    n_emb = model.text_model.embeddings.token_embedding.weight.numel()
    log(f"CLIPModel parameters: {n_par / 1e6:.3f} M ({n_emb / 1e6:.3f} M in the token embedding)")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    total = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    rng = np.random.default_rng([args.seed, 0])  # training scenes, negatives, augmentation
    vrng = np.random.default_rng([args.seed, 1])  # validation scenes (training prompts, never the held-out ones)

    val_caps = [sample_caption(vrng, pool) for _ in range(args.val_size)]
    val_scenes = [scene_for_metadata(m, vrng) for m in val_caps]
    val_imgs = np.stack([render_scene(s) for s in val_scenes])

    t0 = time.time()
    t_data = 0.0
    for step in range(1, total + 1):
        model.train()
        td = time.time()
        images, scenes, caps, negs = sample_batch(rng, pool, args.batch, args.negatives, exclude)
        images = augment(images, rng, args.augment)
        texts = list(dict.fromkeys([m["prompt"] for m in caps] + [r["prompt"] for ns in negs for r in ns]))
        col = {p: j for j, p in enumerate(texts)}
        truth = truth_matrix(scenes, [record(p) for p in texts])
        caption_col = torch.tensor([col[m["prompt"]] for m in caps])
        t_data += time.time() - td
        img = embed_images(model, pixels(images))
        txt = embed_texts(model, tokenizer, texts)
        loss, stats = contrastive_loss(img, txt, model.logit_scale.exp(), truth, caption_col)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t0
            log(f"step {step}/{total} loss {loss.item():.4f} i2t {stats['i2t']:.3f} t2i {stats['t2i']:.3f} "
                f"acc {stats['acc']:.3f} texts {len(texts)} scale {model.logit_scale.exp().item():.1f} "
                f"lr {sched.get_last_lr()[0]:.2e} {el:.0f}s ({el / step:.2f} s/step, data {t_data / step:.2f})")
        if step % args.eval_every == 0 or step == total:
            model.eval()
            acc = hard_negative_accuracy(model, tokenizer, val_imgs, val_caps, val_scenes, exclude)
            log(f"val step {step}: hard-negative accuracy {acc['overall']:.3f} ({args.val_size} scenes of training "
                "prompts; " + ", ".join(f"{t} {v:.2f}" for t, v in acc.items() if t != "overall") + ")")
            model.save_pretrained(work / "model")
            save_processor(processor, work / "model")
    log(f"training done in {time.time() - t0:.0f}s")
    if args.out:
        out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        save_processor(processor, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        log(f"wrote {out} ({size / 2**20:.2f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--negatives", type=int, default=4, help="hard-negative captions per image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150, help="linear learning-rate warm-up steps (then cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--augment", type=float, default=0.5, help="probability of blur/noise per image")
    p.add_argument("--vision-width", type=int, default=96)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--text-width", type=int, default=32)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--tokenizer", default="assets/shapes-sd3/tokenizer", help="a saved CLIPTokenizer (CLIP BPE)")
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--work-dir", default="runs/clip_pretrain")
    p.add_argument("--out", default="assets/shapes-clip", help="final model + processor folder ('' to skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
