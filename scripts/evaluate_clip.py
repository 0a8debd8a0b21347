"""Zero-shot accuracy of the embedded CLIP model (``assets/shapes-clip``) on held-out prompts of the shapes domain.

Scenes are rendered fresh from the 108 held-out prompts (``assets/prompts/shapes_test.jsonl``; never used in
training) with a seed of their own (default 1000; training draws from ``SeedSequence([0, 0])`` / ``([0, 1])``). The
model is loaded exactly as the ``clip_score`` reward loads it (``CLIPModel`` + ``CLIPProcessor``,
:class:`rewards._clip_common.ClipEmbedder`), so the image processor path is the one training rewards use.

Metrics, per task and overall:

* **hard negatives**: the image's own caption must score above every hard negative of it (same template, one
  attribute changed — shape, colour, count, relation, argument order, colours swapped; NegCLIP-style, Yuksekgonul et
  al. 2023) that is false of the scene; *chance* is the mean of ``1 / (1 + #negatives)``;
* **pairwise by kind**: the fraction of (image, negative) pairs of each kind where the own caption wins (chance 0.5);
* **top-1 / top-5 of 108**: retrieval of the image's own prompt among all held-out prompts (CLIP zero-shot
  classification, Radford et al. 2021); *top-1 true*: the best of the 108 is a true caption of the scene (several
  can be: a red-circle scene is also "a photo of a circle").

Run::

    python scripts/evaluate_clip.py                       # 20 scenes per held-out prompt, prints a markdown table
    python scripts/evaluate_clip.py --model runs/clip_pretrain/model --per-prompt 5 --json out.json
    python scripts/evaluate_clip.py --generated assets/shapes-sd3   # + the reward on the embedded SD3's images
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def render_held_out(records: list[dict], per_prompt: int, seed: int):
    """``per_prompt`` fresh scenes of every record: ``(images uint8 [N, 64, 64, 3], scenes, records)`` with
    ``N = per_prompt · len(records)``, deterministic in ``seed``."""
    from flowrl.shapes.render import render_scene, scene_for_metadata

    rng = np.random.default_rng(seed)
    imgs, scenes, recs = [], [], []
    for m in records:
        for _ in range(per_prompt):
            objs = scene_for_metadata(m, rng)
            imgs.append(render_scene(objs))
            scenes.append(objs)
            recs.append(m)
    return np.stack(imgs), scenes, recs


def zero_shot(embedder, images: np.ndarray, scenes, records: list[dict], candidates: list[dict]) -> dict:
    """Zero-shot metrics of a :class:`rewards._clip_common.ClipEmbedder` on captioned scenes.

    Args:
        embedder: gives unit-norm ``image_embeds(uint8 [B, H, W, 3])`` and ``text_embeds(list[str])``.
        images, scenes, records: the scenes (uint8 ``[N, 64, 64, 3]``), their objects and their true records.
        candidates: the caption set for top-k retrieval (the held-out records).

    Returns:
        ``{"per_task": {tag: {...}}, "overall": {...}, "pairwise": {kind: acc}}`` where each row has ``n``,
        ``hard_negative`` (accuracy in [0, 1]), ``chance``, ``top1``, ``top5``, ``top1_true``.
    """
    from flowrl.shapes.captions import caption_holds, hard_negatives

    img = np.concatenate([embedder.image_embeds(images[i : i + 256]).cpu().numpy() for i in range(0, len(images), 256)])
    negs = [hard_negatives(m, objs) for m, objs in zip(records, scenes)]
    texts = list(dict.fromkeys([m["prompt"] for m in records] + [c["prompt"] for c in candidates]
                               + [r["prompt"] for n in negs for v in n.values() for r in v]))
    col = {t: j for j, t in enumerate(texts)}
    txt = np.concatenate([embedder.text_embeds(texts[i : i + 512]).cpu().numpy() for i in range(0, len(texts), 512)])
    sims = img @ txt.T  # [N, T] cosines
    cand_cols = np.array([col[c["prompt"]] for c in candidates])
    rows: dict[str, list[dict]] = defaultdict(list)
    pair: dict[str, list[bool]] = defaultdict(list)
    for i, (m, objs, neg) in enumerate(zip(records, scenes, negs)):
        own = sims[i, col[m["prompt"]]]
        neg_scores = {k: [sims[i, col[r["prompt"]]] for r in v] for k, v in neg.items()}
        flat = [s for v in neg_scores.values() for s in v]
        for k, v in neg_scores.items():
            pair[k] += [own > s for s in v]
        order = cand_cols[np.argsort(-sims[i, cand_cols])]
        rows[m["tag"]].append({
            "hard_negative": float(all(own > s for s in flat)), "chance": 1.0 / (1 + len(flat)),
            "top1": float(texts[order[0]] == m["prompt"]), "top5": float(m["prompt"] in [texts[j] for j in order[:5]]),
            "top1_true": float(caption_holds(next(c for c in candidates if c["prompt"] == texts[order[0]]), objs)),
        })

    def summarise(rs: list[dict]) -> dict:
        return {"n": len(rs), **{k: float(np.mean([r[k] for r in rs])) for k in rs[0]}}

    per_task = {t: summarise(rows[t]) for t in TAGS if rows[t]}
    all_rows = [r for t in TAGS for r in rows[t]]
    return {"per_task": per_task, "overall": summarise(all_rows),
            "macro_hard_negative": float(np.mean([v["hard_negative"] for v in per_task.values()])),
            "pairwise": {k: float(np.mean(v)) for k, v in pair.items() if v},
            "pairwise_n": {k: len(v) for k, v in pair.items() if v}}


def generated_check(reward, pipeline: str, records: list[dict], steps: int = 20, cfg: float = 4.5) -> dict:
    """The reward on images *generated* by a diffusers pipeline (e.g. the embedded ``assets/shapes-sd3``), one per
    record (generator seed = record index), against the shapes detector's GenEval verdict on the same images.

    Returns ``{"n", "geneval_strict", "clip_correct", "clip_incorrect", "auc", "spearman_partial",
    "matched_vs_shifted"}``: mean reward on GenEval-correct / incorrect images, the AUC of the reward for
    correctness, Spearman's ρ with the partial-credit reward, and the fraction of images scoring higher with their
    own prompt than with the next record's.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline
    from scipy.stats import spearmanr

    from flowrl.rewards import load_reward

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    imgs = []
    for i in range(0, len(records), 36):
        chunk = records[i : i + 36]
        gens = [torch.Generator().manual_seed(i + k) for k in range(len(chunk))]
        out = pipe([m["prompt"] for m in chunk], num_inference_steps=steps, guidance_scale=cfg, generator=gens,
                   height=64, width=64, max_sequence_length=0, output_type="np").images
        imgs.append((out * 255).round().astype(np.uint8))
    images = np.concatenate(imgs)
    prompts = [m["prompt"] for m in records]
    r = reward(images, prompts)["reward"]
    shifted = reward(images, prompts[1:] + prompts[:1])["reward"]
    g = load_reward("geneval_shapes")(images, prompts, records)
    ok = g["strict"] > 0.5
    auc = float(np.mean(r[ok][:, None] > r[~ok][None, :])) if ok.any() and (~ok).any() else float("nan")
    return {"n": len(records), "geneval_strict": float(ok.mean()), "clip_correct": float(r[ok].mean()),
            "clip_incorrect": float(r[~ok].mean()), "auc": auc,
            "spearman_partial": float(spearmanr(r, g["reward"]).statistic),
            "matched_vs_shifted": float((r > shifted).mean())}


def markdown(res: dict) -> str:
    """The result of :func:`zero_shot` as two markdown tables (per task; pairwise by negative kind)."""
    lines = ["| task | scenes | hard-negative acc. | chance | top-1 of 108 | top-5 of 108 | top-1 true |",
             "|---|---|---|---|---|---|---|"]
    for name, r in [*res["per_task"].items(), ("**overall**", res["overall"])]:
        lines.append(f"| {name} | {r['n']} | {r['hard_negative']:.3f} | {r['chance']:.3f} | {r['top1']:.3f} | "
                     f"{r['top5']:.3f} | {r['top1_true']:.3f} |")
    lines += ["", "| negative kind | pairs | own caption wins |", "|---|---|---|"]
    for k, v in res["pairwise"].items():
        lines.append(f"| {k} | {res['pairwise_n'][k]} | {v:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-clip")
    p.add_argument("--prompts", default="assets/prompts/shapes_test.jsonl")
    p.add_argument("--per-prompt", type=int, default=20, help="scenes rendered per held-out prompt")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the metrics here")
    p.add_argument("--generated", default=None, metavar="PIPELINE",
                   help="also score one image per held-out prompt generated by this diffusers SD3 folder "
                        "(e.g. assets/shapes-sd3; 20 steps, CFG 4.5) against the shapes detector's GenEval verdict")
    args = p.parse_args()
    for key in ("model", "prompts", "json", "generated"):  # paths given relative to the caller's directory stay valid
        val = getattr(args, key)
        if val and (Path(val).exists() or (key == "json" and Path(val).parent.exists())):
            setattr(args, key, str(Path(val).resolve()))
    os.chdir(ROOT)  # relative paths (assets/...) resolve from the project root, as in the configs
    import torch

    torch.set_num_threads(args.threads)
    from flowrl.rewards import load_reward
    from flowrl.shapes.prompts import read_jsonl

    reward = load_reward("clip_score", model=args.model)
    records = read_jsonl(args.prompts)
    images, scenes, recs = render_held_out(records, args.per_prompt, args.seed)
    res = zero_shot(reward.embedder, images, scenes, recs, records)
    print(f"model {args.model}: {len(recs)} scenes ({args.per_prompt} per prompt of {args.prompts}), seed {args.seed}")
    print(markdown(res))
    print(f"macro-average hard-negative accuracy over tasks: {res['macro_hard_negative']:.3f}")
    if args.generated:
        res["generated"] = gen = generated_check(reward, args.generated, records)
        print(f"generated by {args.generated} ({gen['n']} images, GenEval-correct {gen['geneval_strict']:.3f}): "
              f"reward {gen['clip_correct']:.3f} on correct vs {gen['clip_incorrect']:.3f} on incorrect images, "
              f"AUC {gen['auc']:.3f}, Spearman vs partial credit {gen['spearman_partial']:.3f}, own prompt above "
              f"another prompt for {gen['matched_vs_shifted']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
