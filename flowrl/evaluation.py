"""Evaluation: ODE sampling at the evaluation step count, rewards, GenEval-style summaries, grids and reports.

The same protocol serves the base model, a checkpoint and the end of training: image ``k`` of prompt ``i`` is drawn
from seed ``seed + i·images_per_prompt + k`` whatever the model, so two models are compared on identical noise.

:func:`evaluate` scores GenEval metadata with one reward (the trainer's held-out evaluation);
:func:`evaluate_benchmark` scores any prompt file of :mod:`flowrl.prompt_sets` (GenEval, OCR, plain) with several
rewards at once (:func:`parse_reward_specs`, :class:`RewardSet`) and adds per-reward, per-task / per-category means
(:func:`benchmark_summary`) that :mod:`flowrl.eval_report` turns into side-by-side reports.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowrl.flow.rollout import sample_trajectory
from flowrl.rewards import check_reward_output


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] → ``[B, H, W, 3]`` uint8 (round to nearest, as diffusers' ``numpy_to_pil``)."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def generate(adapter, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, resolution: int,
             noise_level: float = 0.0, kind: str = "sde") -> np.ndarray:
    """Images for ``prompts`` (one per prompt) with per-image seeds; ODE by default. Returns uint8 ``[B, H, W, 3]``."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    sigmas = adapter.sigmas(steps)  # first: the UNet family's initial noise depends on the grid
    x = adapter.initial_noise(gens, resolution, resolution)
    cond = adapter.encode(prompts)
    traj = sample_trajectory(lambda z, s: adapter.velocity(z, s, cond, guidance_scale), x, sigmas,
                             torch.full((steps,), float(noise_level)), kind=kind, generators=gens)
    return to_uint8(adapter.decode(traj.final))


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, scale: int = 2) -> Path:
    """Save uint8 images ``[N, H, W, 3]`` as one PNG grid (``ncol`` columns, nearest-neighbour ``scale``)."""
    n, h, w, _ = images.shape
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + 2), ncol * (w + 2), 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path


def group_diversity(images: np.ndarray, group_ids) -> float:
    """Mean within-group image diversity: for every group with ≥ 2 images, the mean over its image pairs of the RMS
    pixel difference (images scaled to ``[0, 1]``), averaged over groups. ``images`` is uint8 ``[N, H, W, 3]``,
    ``group_ids`` ``[N]``. Range ``[0, 1]``; 0 when every group's images are identical (mode collapse) or no group
    has two images. A reward-hacking monitor: a falling value while the reward rises means the policy is
    collapsing onto a few images per prompt.
    """
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0
    gids = np.asarray(group_ids)
    vals = []
    for g in np.unique(gids):
        xg = x[gids == g]
        if len(xg) < 2:
            continue
        sq = (xg ** 2).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None] - 2 * xg @ xg.T, 0.0) / x.shape[1]
        iu = np.triu_indices(len(xg), 1)
        vals.append(float(np.sqrt(d2[iu]).mean()))
    return float(np.mean(vals)) if vals else 0.0


def summarize(records: list[dict]) -> dict:
    """Summary of per-image records.

    GenEval-style when records carry ``tag``/``strict``: per-task strict accuracy, overall = mean of tasks, % correct
    images and prompts, mean partial credit (the ``partial`` column if present, else ``reward``). Otherwise (OCR,
    preference rewards): the mean of every numeric reward column (not ``prompt_index`` / ``image_index``),
    ``overall`` = the mean ``reward`` column, and, when records carry more than one ``tag``, ``by_tag``:
    ``{tag: {column: mean}}`` (e.g. the OCR file's ``ocr`` / ``ocr_new_word`` prompts).
    """
    from flowrl.geneval.scoring import score_records

    if records and "strict" in records[0] and "tag" in records[0]:
        return score_records([{"prompt": r["prompt"], "tag": r["tag"], "correct": bool(r["strict"]),
                               "partial": float(r.get("partial", r["reward"]))} for r in records])
    keys = ([k for k, v in records[0].items() if isinstance(v, (int, float)) and k not in _INDEX_COLUMNS]
            if records else [])
    out = {k: float(np.mean([r[k] for r in records])) for k in keys}
    if "reward" in out:
        out["overall"] = out["reward"]
    tags = sorted({str(r.get("tag", "")) for r in records})
    if len(tags) > 1:
        out["by_tag"] = {t: {k: float(np.mean([r[k] for r in records if str(r.get("tag", "")) == t])) for k in keys}
                         for t in tags}
    return out


def run_summary(records: list[dict], images_per_prompt: int, steps: int, guidance_scale: float, seed: int) -> dict:
    """:func:`summarize` of ``records`` plus the evaluation protocol (images per prompt, ODE steps, CFG, seed)."""
    return {**summarize(records), "images_per_prompt": images_per_prompt, "steps": steps,
            "guidance_scale": guidance_scale, "seed": seed}


def _score(adapter, metadata: list[dict], reward_fn, *, images_per_prompt: int, steps: int, guidance_scale: float,
           resolution: int, seed: int, batch: int, out: Path | None, progress: bool, geneval_layout: bool,
           desc: str) -> tuple[list[dict], list[np.ndarray]]:
    """Generate and score every image of ``metadata``: ``(records, first image of each prompt)``; writes the
    GenEval folder layout under ``out/images`` when asked."""
    from tqdm.auto import tqdm

    jobs = [(i, k) for i in range(len(metadata)) for k in range(images_per_prompt)]
    records, firsts = [], []
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
    for j in range(0, len(jobs), batch):
        chunk = jobs[j : j + batch]
        mds = [metadata[i] for i, _ in chunk]
        prompts = [m["prompt"] for m in mds]
        imgs = generate(adapter, prompts, [seed + i * images_per_prompt + k for i, k in chunk], steps,
                        guidance_scale, resolution)
        cols = check_reward_output(reward_fn(imgs, prompts, mds), len(imgs), getattr(reward_fn, "name", "reward"))
        for n, ((i, k), md) in enumerate(zip(chunk, mds)):
            rec = {"prompt": md["prompt"], "tag": md.get("tag", ""), "prompt_index": i, "image_index": k}
            if "category" in md:
                rec["category"] = md["category"]
            rec.update({c: float(v[n]) for c, v in cols.items()})
            records.append(rec)
            if k == 0:
                firsts.append(imgs[n])
            if out is not None and geneval_layout:
                d = out / "images" / f"{i:05d}"
                (d / "samples").mkdir(parents=True, exist_ok=True)
                if k == 0:
                    (d / "metadata.jsonl").write_text(json.dumps(md) + "\n")
                Image.fromarray(imgs[n]).save(d / "samples" / f"{k:04d}.png")
        bar.update(len(chunk))
    bar.close()
    return records, firsts


def _write(out: Path, records: list[dict], summary: dict, summary_md: str, firsts: list[np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_md)
    if firsts:
        save_grid(np.stack(firsts[:64]), out / "grid.png")


@torch.no_grad()
def evaluate(adapter, metadata: list[dict], reward_fn, *, images_per_prompt: int = 4, steps: int = 40,
             guidance_scale: float = 4.5, resolution: int = 64, seed: int = 0, batch: int = 32,
             out_dir: str | Path | None = None, progress: bool = False, geneval_layout: bool = True,
             desc: str = "evaluate") -> dict:
    """Score ``adapter`` on GenEval metadata records with ODE sampling.

    Writes, when ``out_dir`` is given: ``results.jsonl`` (one line per image: prompt, tag, image index, every reward
    column), ``summary.json``, ``summary.md`` (per-task table), ``grid.png`` (first image of each prompt) and, with
    ``geneval_layout``, the official evaluator's folder layout ``<NNNNN>/metadata.jsonl`` + ``samples/<dddd>.png``.
    ``desc`` labels the progress bar.

    Returns:
        The summary dict (see :func:`summarize`) with ``"records"`` omitted.
    """
    out = Path(out_dir) if out_dir else None
    records, firsts = _score(adapter, metadata, reward_fn, images_per_prompt=images_per_prompt, steps=steps,
                             guidance_scale=guidance_scale, resolution=resolution, seed=seed, batch=batch, out=out,
                             progress=progress, geneval_layout=geneval_layout, desc=desc)
    summary = run_summary(records, images_per_prompt, steps, guidance_scale, seed)
    if out is not None:
        _write(out, records, summary, markdown_table({"score": summary}), firsts)
    return summary


# -- benchmark evaluation: several rewards, any prompt file ----------------------------------------------------
_SPEC_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside braces, brackets and JSON strings (``a,b={"x": [1, 2]}`` → two parts)."""
    parts, depth, quoted, escaped, cur = [], 0, False, False, []
    for ch in text:
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_reward_specs(values: list[str] | str) -> list[tuple[str, str, dict]]:
    """Parse ``--reward`` values into ``(label, registered name, constructor kwargs)``.

    Each value is one or more comma-separated specs ``name`` or ``name={json object of arguments}``, e.g.
    ``clip_score,aesthetic`` or ``'clip_score={"model": "openai/clip-vit-large-patch14"}'``. A name given twice
    (with different arguments) is labelled ``name``, ``name_2``, ...

    Raises:
        ValueError: an empty spec list, a malformed name, or arguments that are not a JSON object.
    """
    if isinstance(values, str):
        values = [values]
    specs: list[tuple[str, str, dict]] = []
    seen: dict[str, int] = {}
    for value in values:
        for spec in _split_top_level(value):
            name, eq, arg = spec.partition("=")
            name = name.strip()
            if not _SPEC_NAME.match(name):
                raise ValueError(f"--reward {spec!r}: expected NAME or NAME={{json arguments}}")
            kwargs: dict = {}
            if eq:
                try:
                    kwargs = json.loads(arg)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--reward {spec!r}: the arguments after '=' are not valid JSON ({e.msg}); "
                                     f"write e.g. {name}={{\"model\": \"...\"}}") from e
                if not isinstance(kwargs, dict):
                    raise ValueError(f"--reward {spec!r}: the arguments after '=' must be a JSON object")
            seen[name] = seen.get(name, 0) + 1
            specs.append((name if seen[name] == 1 else f"{name}_{seen[name]}", name, kwargs))
    if not specs:
        raise ValueError("no reward given; pass --reward NAME (several allowed)")
    return specs


class RewardSet:
    """Several loaded rewards scored together, as one reward callable.

    With one reward its columns are returned unchanged (so a single-reward evaluation is exactly the classic one).
    With several: ``<label>`` = that reward's ``reward``, ``<label>/<column>`` = its extra columns, an extra column
    only one reward has also under its bare name (so GenEval's ``strict`` / ``partial`` drive the GenEval summary),
    and ``reward`` = the first reward's value (the primary reward).

    Args:
        rewards: ``{label: reward callable}`` in report order.
    """

    def __init__(self, rewards: dict):
        if not rewards:
            raise ValueError("RewardSet needs at least one reward")
        self.rewards = dict(rewards)
        self.labels = list(self.rewards)
        self.name = "+".join(self.labels)

    @property
    def columns(self) -> dict[str, str]:
        """``{label: the result column holding that reward's value}``."""
        if len(self.labels) == 1:
            return {self.labels[0]: "reward"}
        return {label: label for label in self.labels}

    def __call__(self, images: np.ndarray, prompts: list[str], metadata) -> dict[str, np.ndarray]:
        if len(self.labels) == 1:
            label = self.labels[0]
            return check_reward_output(self.rewards[label](images, prompts, metadata), len(images), label)
        out: dict[str, np.ndarray] = {}
        extras: dict[str, list[np.ndarray]] = {}
        for label, fn in self.rewards.items():
            cols = check_reward_output(fn(images, prompts, metadata), len(images), label)
            out[label] = cols["reward"]
            for k, v in cols.items():
                if k != "reward":
                    out[f"{label}/{k}"] = v
                    extras.setdefault(k, []).append(v)
        for k, vs in extras.items():
            if len(vs) == 1 and k not in out:
                out[k] = vs[0]
        out["reward"] = out[self.labels[0]]
        return out


def load_rewards(specs: list[tuple[str, str, dict]]) -> RewardSet:
    """Instantiate parsed ``--reward`` specs (:func:`parse_reward_specs`) with :func:`flowrl.rewards.load_reward`.

    Raises:
        KeyError: an unknown name (the registry's message, listing the registered rewards).
        ImportError: a reward whose module or optional dependency is missing.
        ValueError: arguments the reward does not accept or rejects (the reward named).
    """
    from flowrl.rewards import load_reward

    rewards = {}
    for label, name, kwargs in specs:
        try:
            rewards[label] = load_reward(name, **kwargs)
        except TypeError as e:
            raise ValueError(f"reward {name!r}: bad arguments {kwargs}: {e}") from e
    return RewardSet(rewards)


_INDEX_COLUMNS = ("prompt_index", "image_index")


def benchmark_summary(records: list[dict], *, kind: str, reward_columns: dict[str, str],
                      group_key: str | None = None) -> dict:
    """Every reward's mean, overall and per group, from per-image records (as :func:`evaluate` writes them).

    Args:
        records: one dict per image with ``prompt_index`` and float reward columns.
        kind: the prompt-file kind (``geneval`` / ``ocr`` / ``plain``).
        reward_columns: ``{reward label: column}`` (:attr:`RewardSet.columns`).
        group_key: record field to group by (``tag`` = GenEval task, ``category``), or ``None``.

    Returns:
        ``{"kind", "n_prompts", "n_images", "reward_columns", "group_key", "rewards": {label: mean},
        "columns": {column: mean}, "groups": {group: {"n_images", "n_prompts", column: mean, ...}}}`` plus, for
        GenEval records with ``strict``, ``"geneval"``: :func:`summarize`'s per-task strict accuracies, overall,
        correct images/prompts and partial credit.

    Raises:
        ValueError: no records, or a reward column missing from the records.
    """
    if not records:
        raise ValueError("benchmark_summary needs at least one record")
    cols = [k for k, v in records[0].items() if isinstance(v, float) and k not in _INDEX_COLUMNS]
    missing = [c for c in reward_columns.values() if c not in cols]
    if missing:
        raise ValueError(f"reward columns {missing} are not in the records (columns: {cols})")

    def means(rs: list[dict]) -> dict[str, float]:
        return {c: float(np.mean([r[c] for r in rs])) for c in cols}

    col_means = means(records)
    out = {"kind": kind, "n_prompts": len({r["prompt_index"] for r in records}), "n_images": len(records),
           "reward_columns": dict(reward_columns), "group_key": group_key,
           "rewards": {label: col_means[c] for label, c in reward_columns.items()}, "columns": col_means,
           "groups": {}}
    if group_key:
        by: dict[str, list[dict]] = {}
        for r in records:
            by.setdefault(str(r.get(group_key, "")), []).append(r)
        out["groups"] = {g: {"n_images": len(rs), "n_prompts": len({r["prompt_index"] for r in rs}), **means(rs)}
                         for g, rs in by.items()}
    if kind == "geneval" and "strict" in cols and all(r.get("tag") for r in records):
        out["geneval"] = summarize(records)
    return out


@torch.no_grad()
def evaluate_benchmark(adapter, metadata: list[dict], reward_fn, *, kind: str = "geneval",
                       reward_columns: dict[str, str] | None = None, group_key: str | None = None,
                       images_per_prompt: int = 4, steps: int = 40, guidance_scale: float = 4.5,
                       resolution: int = 64, seed: int = 0, batch: int = 32, out_dir: str | Path | None = None,
                       progress: bool = False, desc: str = "evaluate") -> dict:
    """:func:`evaluate` for any prompt file (:mod:`flowrl.prompt_sets`) and several rewards (:class:`RewardSet`).

    Same sampling protocol and files as :func:`evaluate` (``results.jsonl``, ``summary.json``, ``grid.png``, the
    GenEval folder layout ``images/``), with ``summary.json`` extended by ``"benchmark"`` (:func:`benchmark_summary`)
    and ``summary.md`` holding the readable tables (:mod:`flowrl.eval_report`).

    Returns:
        The :func:`evaluate` summary plus ``"benchmark"``.
    """
    from flowrl.eval_report import render_markdown, summary_sections

    reward_columns = (reward_columns or getattr(reward_fn, "columns", None)
                      or {getattr(reward_fn, "name", "reward"): "reward"})
    out = Path(out_dir) if out_dir else None
    records, firsts = _score(adapter, metadata, reward_fn, images_per_prompt=images_per_prompt, steps=steps,
                             guidance_scale=guidance_scale, resolution=resolution, seed=seed, batch=batch, out=out,
                             progress=progress, geneval_layout=True, desc=desc)
    summary = run_summary(records, images_per_prompt, steps, guidance_scale, seed)
    summary["benchmark"] = benchmark_summary(records, kind=kind, reward_columns=reward_columns, group_key=group_key)
    if out is not None:
        md = render_markdown(summary_sections({"score": summary["benchmark"]}), ["score"], base=None)
        _write(out, records, summary, md, firsts)
    return summary


_PROTOCOL_KEYS = ("images_per_prompt", "steps", "guidance_scale", "seed")  # run_summary's protocol, not metrics


def markdown_table(summaries: dict[str, dict]) -> str:
    """A markdown table with one column per model (``summaries`` maps a label to a :func:`summarize` dict)."""
    labels = list(summaries)
    first = summaries[labels[0]]
    if "tasks" in first:
        tasks = list(first["tasks"])
        lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(f"{summaries[l]['tasks'].get(t, float('nan')):.3f}" for l in labels) + " |")
        for key in ("overall", "correct_images", "correct_prompts", "partial"):
            lines.append(f"| **{key}** | " + " | ".join(f"{summaries[l][key]:.3f}" for l in labels) + " |")
        return "\n".join(lines) + "\n"
    keys = [k for k, v in first.items() if isinstance(v, float) and k not in _PROTOCOL_KEYS]
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {k} | " + " | ".join(f"{summaries[l][k]:.4f}" for l in labels) + " |" for k in keys]
    for tag, cols in first.get("by_tag", {}).items():
        lines += [f"| {k} · {tag} | " + " | ".join(f"{summaries[l].get('by_tag', {}).get(tag, {}).get(k, float('nan')):.4f}"
                                                   for l in labels) + " |" for k in cols]
    return "\n".join(lines) + "\n"
