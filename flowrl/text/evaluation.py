"""Held-out evaluation of a VLM on VQA records: greedy decoding, exact-match accuracy per tag, format rate, a report.

Protocol (``scripts/evaluate_vlm.py`` and the trainer's base/final evaluations): every held-out record once, greedy
decoding (argmax; vision tokens suppressed) up to the policy's ``max_new_tokens``, the answer is the last
``<answer>…</answer>`` compared with the reference after :func:`flowrl.text.vqa.normalize_answer`. Overall accuracy
is the mean over records (tags are balanced in the embedded split); ``format`` is the share of completions that match
``<think>…</think><answer>…</answer>`` exactly.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def evaluate_policy(policy, records: list[dict], batch: int = 128, seed: int = 0) -> dict:
    """Greedy answers and scores for ``records``.

    Args:
        policy: a :class:`~flowrl.text.policy.VLMPolicy`. records: VQA records (``question``, ``answer``, ``tag`` and
            ``objects`` or ``image``). batch: prompts per ``generate`` call.

    Returns:
        ``{"records": [{question, answer, tag, completion, prediction, correct, format}], "summary": {accuracy,
        format, n, per-tag accuracies "tag/<tag>"}}``.
    """
    from flowrl.text.trainer import render_images
    from flowrl.text.vqa import is_formatted, normalize_answer, parse_answer

    rows = []
    for j in range(0, len(records), batch):
        recs = records[j : j + batch]
        inputs = policy.prompt_inputs(render_images(recs), [r["question"] for r in recs])
        comp = policy.generate(inputs, seed=seed + j, greedy=True)
        for r, text in zip(recs, comp.text):
            pred = parse_answer(text)
            rows.append({"question": r["question"], "answer": r["answer"], "tag": r.get("tag", ""),
                         "completion": text, "prediction": pred,
                         "correct": float(pred is not None and normalize_answer(pred) == normalize_answer(r["answer"])),
                         "format": float(is_formatted(text))})
    by_tag = defaultdict(list)
    for r in rows:
        by_tag[r["tag"]].append(r["correct"])
    n = max(1, len(rows))
    summary = {"accuracy": sum(r["correct"] for r in rows) / n, "format": sum(r["format"] for r in rows) / n,
               "n": len(rows), **{f"tag/{k}": sum(v) / len(v) for k, v in sorted(by_tag.items())}}
    return {"records": rows, "summary": summary}


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write ``results.jsonl``, ``summary.json`` and ``summary.md`` (a per-tag table) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in result["records"]))
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2))
    (out / "summary.md").write_text(comparison_table({"score": result["summary"]}))
    return out


def comparison_table(summaries: dict[str, dict]) -> str:
    """A markdown table: one row per tag, then accuracy and format; one column per named summary."""
    names = list(summaries)
    tags = sorted({k for s in summaries.values() for k in s if k.startswith("tag/")})
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in tags:
        lines.append(f"| {k[4:]} | " + " | ".join(f"{s.get(k, float('nan')):.3f}" for s in summaries.values()) + " |")
    for k in ("accuracy", "format"):
        lines.append(f"| **{k}** | " + " | ".join(f"{s[k]:.3f}" for s in summaries.values()) + " |")
    return "\n".join(lines) + "\n"
