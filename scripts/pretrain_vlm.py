"""Supervised fine-tuning of the embedded default VLM: a tiny Qwen2-VL answering questions about shapes scenes.

Algorithmic choices, top to bottom:

- Data: the VQA splits of :mod:`flowrl.text.vqa` (``assets/vqa/vqa_train.jsonl`` / ``vqa_test.jsonl``, written by
  ``scripts/make_vqa.py``; generated in memory with the same defaults if the files are missing). Five balanced
  question families (count, color, shape, position, exists); held-out scenes are never trained on.
- Model: :func:`flowrl.text.tiny_qwen2vl.build_tiny_qwen2vl` (random init, ``--seed``) or ``--init-from`` a folder.
- Sequence: Qwen2-VL chat (default system message, one image = 16 ``<|image_pad|>`` tokens, the question), then the
  assistant target ``<think>REASONING</think><answer>ANSWER</answer><|im_end|>`` (a one-sentence templated
  reasoning, :func:`flowrl.text.vqa.target_text`). Cross-entropy on the assistant tokens only (prompt and padding are
  ``-100``), averaged over the batch's assistant tokens.
- Optimisation: AdamW (β = 0.9/0.95, weight decay 0.01 on matrices only), linear warm-up then cosine decay to 10 %
  of ``--lr`` over ``--steps``, gradient clipping at 1, shuffled epochs; optional EMA of the weights (``--ema``;
  the EMA weights are evaluated and shipped when enabled). ``--stop-after`` ends early without changing the schedule.
- Evaluation: every ``--eval-every`` steps, greedy decoding (``model.generate``, ``do_sample=False``) on
  ``--eval-n`` *validation* records (held-out-style scenes from another seed range: ``make_vqa(n, data_seed + 1,
  "test")``, disjoint from both files); the answer is the last ``<answer>…</answer>``, compared after
  :func:`flowrl.text.vqa.normalize_answer` (exact match). At the end: every record of the held-out file, with a
  per-tag table. Chance (uniform guess within each family) is 0.31.
- Early stop: training ends at the first validation accuracy ≥ ``--target-accuracy`` (0 = never). The embedded
  model must stay clearly imperfect (held-out accuracy roughly 0.35–0.7) so that RL has room to improve it; the
  target, not the step count, is what keeps it in that band. Selecting on validation records keeps the held-out
  split untouched.

Throughput (measured: 1 thread, the other core busy with another training job): ≈ 2.9–3.1 steps/s at batch 32
(≈ 95 examples/s; 27 ms of rendering + processing and ≈ 300 ms of forward/backward per step); a periodic evaluation of
250 records takes ≈ 1.3 s. The defaults (4,000 steps) therefore take ≈ 23–25 min, less when the target stops them.
Run::

    python scripts/make_vqa.py                                     # assets/vqa/*.jsonl (seconds)
    python scripts/pretrain_vlm.py                                 # writes assets/shapes-qwen2vl (≤ 25 min)
    python scripts/pretrain_vlm.py --steps 200 --out /tmp/vlm --log /tmp/vlm.log   # smoke run (≈ 1 min)

The result loads like ``Qwen/Qwen2-VL-2B-Instruct``: ``Qwen2VLForConditionalGeneration.from_pretrained(out)`` and
``AutoProcessor.from_pretrained(out)`` (torchvision installed) or ``flowrl.text.tiny_qwen2vl.load_processor(out)``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowrl.text.tiny_qwen2vl import build_tiny_qwen2vl, load_tiny_qwen2vl, save_tiny_qwen2vl, vqa_messages
from flowrl.text.vqa import (TAGS, make_vqa, normalize_answer, parse_answer, read_jsonl, render_record,
                             target_text)

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------

def prompt_texts(processor, records: list[dict]) -> list[str]:
    """Chat-template prompts (ending with ``<|im_start|>assistant\\n``) for the records' questions."""
    return [processor.apply_chat_template(vqa_messages(r["question"]), add_generation_prompt=True, tokenize=False)
            for r in records]


def images_of(records: list[dict]) -> list[Image.Image]:
    """The records' scenes rendered as 64×64 RGB PIL images."""
    return [Image.fromarray(render_record(r)) for r in records]


def sft_batch(processor, records: list[dict]) -> dict[str, torch.Tensor]:
    """Model inputs and labels for SFT on ``records``.

    Returns:
        The processor's batch (``input_ids [B, L]``, ``attention_mask [B, L]``, ``mm_token_type_ids [B, L]``,
        ``pixel_values [B·64, 384]``, ``image_grid_thw [B, 3]``; left padded) plus ``labels [B, L]``: the input ids
        on the assistant target tokens (``target_text(rec) + "<|im_end|>"``), ``-100`` elsewhere.

    Raises:
        RuntimeError: if the tokens of a row's end differ from the separately tokenised target (the template and
            target would not tokenise independently, so the mask would be wrong).
    """
    tok = processor.tokenizer
    targets = [target_text(r) + "<|im_end|>" for r in records]
    texts = [p + t for p, t in zip(prompt_texts(processor, records), targets)]
    batch = processor(text=texts, images=images_of(records), padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGNORE)
    for i, t in enumerate(targets):
        t_ids = tok(t, add_special_tokens=False)["input_ids"]
        n = len(t_ids)
        if tok.padding_side != "left" or ids[i, -n:].tolist() != t_ids:
            raise RuntimeError(f"the target of record {i} does not tokenise at the end of its row (left padding "
                               "and an added <think> token are required)")
        labels[i, -n:] = ids[i, -n:]
    batch["labels"] = labels
    return batch


@torch.no_grad()
def generate_answers(model, processor, records: list[dict], batch_size: int = 64,
                     max_new_tokens: int = 32) -> list[str]:
    """Greedy generations (decoded without special tokens, so ``<think>``/``<answer>`` tags remain) for the records."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    for k in range(0, len(records), batch_size):
        recs = records[k:k + batch_size]
        batch = processor(text=prompt_texts(processor, recs), images=images_of(recs), padding=True,
                          return_tensors="pt")
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out


def score(records: list[dict], generations: list[str]) -> dict:
    """Exact-match accuracy overall and per tag, and the share of generations with a parseable answer."""
    per_tag: dict[str, list[bool]] = collections.defaultdict(list)
    parsed = 0
    for r, g in zip(records, generations):
        a = parse_answer(g)
        parsed += a is not None
        per_tag[r["tag"]].append(a is not None and normalize_answer(a) == normalize_answer(r["answer"]))
    allv = [v for vs in per_tag.values() for v in vs]
    return {"accuracy": float(np.mean(allv)) if allv else 0.0, "format": parsed / max(1, len(records)),
            "per_tag": {t: float(np.mean(per_tag[t])) for t in TAGS if per_tag[t]},
            "n_per_tag": {t: len(per_tag[t]) for t in TAGS if per_tag[t]}}


def tag_table(result: dict) -> str:
    """A small Markdown table of per-tag accuracy."""
    lines = ["| tag | n | accuracy |", "|---|---|---|"]
    for t, acc in result["per_tag"].items():
        lines.append(f"| {t} | {result['n_per_tag'][t]} | {acc:.3f} |")
    lines.append(f"| **all** | {sum(result['n_per_tag'].values())} | **{result['accuracy']:.3f}** |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------

def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Multiplier of the base learning rate at step ``s`` (0-based): linear warm-up, then cosine to ``floor``."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        p = min(1.0, (s - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def make_optimizer(model, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with weight decay on ≥ 2-D parameters only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def sft_step(model, batch: dict, opt, sched=None, clip: float = 1.0) -> float:
    """One optimiser step on ``batch`` (from :func:`sft_batch`); returns the loss before the step."""
    model.train()
    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def load_splits(args) -> tuple[list[dict], list[dict]]:
    train_f, test_f = Path(args.train_file), Path(args.test_file)
    if train_f.is_file() and test_f.is_file():
        return read_jsonl(train_f), read_jsonl(test_f)
    print(f"note: {train_f} / {test_f} missing; generating the default splits in memory (scripts/make_vqa.py "
          "writes them)", flush=True)
    return make_vqa(10_000, args.data_seed, "train"), make_vqa(1_000, args.data_seed, "test")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="length of the LR schedule")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of in-memory splits when the files are missing")
    ap.add_argument("--train-file", default=str(ROOT / "assets" / "vqa" / "vqa_train.jsonl"))
    ap.add_argument("--test-file", default=str(ROOT / "assets" / "vqa" / "vqa_test.jsonl"))
    ap.add_argument("--init-from", default=None, help="continue from a saved model folder instead of random init")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=250, help="validation records for periodic evaluation")
    ap.add_argument("--target-accuracy", type=float, default=0.55,
                    help="stop at the first periodic validation accuracy >= this (0 = never)")
    ap.add_argument("--final-eval-n", type=int, default=None, help="held-out records at the end (default: all)")
    ap.add_argument("--out", default=str(ROOT / "assets" / "shapes-qwen2vl"))
    ap.add_argument("--log", default=str(ROOT / "runs" / "pretrain_vlm" / "train.log"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_f = open(log_path, "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    train, test = load_splits(args)
    if args.init_from:
        model, processor = load_tiny_qwen2vl(args.init_from)
        model.train()
    else:
        model, processor = build_tiny_qwen2vl(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# pretrain_vlm {vars(args)}")
    log(f"model: {n_params / 1e6:.3f} M parameters; train {len(train)} / held-out {len(test)} records")
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    opt = make_optimizer(model, args.lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    rng = np.random.default_rng(args.seed)
    order, pos = rng.permutation(len(train)), 0
    last = min(args.steps, args.stop_after or args.steps)
    eval_recs = make_vqa(args.eval_n, args.data_seed + 1, "test")  # validation: disjoint from train and test
    t0, losses, t_data, t_step = time.time(), [], 0.0, 0.0
    for step in range(1, last + 1):
        ta = time.time()
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(train)), 0
        recs = [train[i] for i in order[pos:pos + args.batch]]
        pos += args.batch
        batch = sft_batch(processor, recs)
        tb = time.time()
        losses.append(sft_step(model, batch, opt, sched))
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - args.ema)
        tc = time.time()
        t_data, t_step = t_data + tb - ta, t_step + tc - tb
        if step % 25 == 0 or step == last:
            el = time.time() - t0
            log(f"step {step} loss {np.mean(losses[-25:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{step / el:.2f} steps/s (data {t_data / step * 1e3:.0f} ms, step {t_step / step * 1e3:.0f} ms) "
                f"elapsed {el / 60:.1f} min")
        if args.eval_every and (step % args.eval_every == 0) and step != last:
            te = time.time()
            res = score(eval_recs, generate_answers(ema or model, processor, eval_recs))
            log(f"eval step {step}: validation accuracy {res['accuracy']:.3f} (n={len(eval_recs)}, format "
                f"{res['format']:.2f}) " + " ".join(f"{t}={a:.2f}" for t, a in res["per_tag"].items())
                + f" [{time.time() - te:.1f} s]")
            if args.target_accuracy and res["accuracy"] >= args.target_accuracy:
                log(f"validation accuracy {res['accuracy']:.3f} >= target {args.target_accuracy}: stopping")
                last = step
                break

    final = ema or model
    out = save_tiny_qwen2vl(final, processor, args.out)
    log(f"saved {'EMA ' if ema is not None else ''}weights to {out}")
    final_recs = test[:args.final_eval_n] if args.final_eval_n else test
    te = time.time()
    res = score(final_recs, generate_answers(final, processor, final_recs))
    log(f"final held-out accuracy {res['accuracy']:.3f} (n={len(final_recs)}, format {res['format']:.2f}, "
        f"{time.time() - te:.0f} s; chance 0.31) after {last} steps, {(time.time() - t0) / 60:.1f} min")
    log(tag_table(res))
    log_f.close()
    res["steps"], res["minutes"], res["losses"] = last, (time.time() - t0) / 60, losses
    return res


if __name__ == "__main__":
    main()
