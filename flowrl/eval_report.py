"""Readable benchmark reports: tables with one column per model, differences vs the base, image grids.

Input: per-model benchmark summaries (:func:`flowrl.evaluation.benchmark_summary`) and the per-model folders written
by :func:`flowrl.evaluation.evaluate_benchmark` (``results.jsonl``, ``grid.png``, ``images/<NNNNN>/samples/``).
Output: ``comparison.md``, ``comparison.json`` and ``report.html`` (images are relative links into the model folders,
so the output folder can be moved or served as a whole). Everything is built from :func:`summary_sections`, a list of
tables ``{"title", "fmt", "rows": [[row name, {model: value}]]}``, so the markdown, the HTML and the JSON agree.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

GENEVAL_ROWS = (("overall", "GenEval overall (mean of tasks, strict)"), ("correct_images", "correct images"),
                ("correct_prompts", "prompts with ≥ 1 correct image"), ("partial", "partial credit"))


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summary_sections(summaries: dict[str, dict]) -> list[dict]:
    """Tables comparing benchmark summaries (``{model label: benchmark summary}``, the first one sets the rows).

    Sections: ``Summary`` (GenEval overall / correct images / correct prompts / partial credit when present, every
    reward's mean, then every other numeric column's mean); for GenEval, the strict accuracy per task; for every
    reward, its mean per task / category when the prompts are grouped.
    """
    labels = list(summaries)
    first = summaries[labels[0]]
    rows: list[list] = []
    if "geneval" in first:
        for key, name in GENEVAL_ROWS:
            rows.append([name, {m: _num(summaries[m].get("geneval", {}).get(key)) for m in labels}])
    reward_columns = first["reward_columns"]
    for label in reward_columns:
        rows.append([f"{label} (mean reward)", {m: _num(summaries[m]["rewards"].get(label)) for m in labels}])
    shown = set(reward_columns.values()) | {"reward"}
    namespaced = {c.rsplit("/", 1)[1] for c in first["columns"] if "/" in c}
    for col in first["columns"]:
        base_name = col.rsplit("/", 1)[-1]
        if "geneval" in first and base_name in ("strict", "partial"):
            continue  # already shown as correct images / partial credit
        if col not in shown and col not in namespaced:  # a bare alias of one reward's extra column is shown once
            rows.append([f"{col} (mean)", {m: _num(summaries[m]["columns"].get(col)) for m in labels}])
    sections = [{"title": "Summary", "fmt": ".4f", "rows": rows}]
    groups = list(first.get("groups") or {})
    for s in list(summaries.values())[1:]:
        groups += [g for g in (s.get("groups") or {}) if g not in groups]
    if "geneval" in first:
        tasks = list(first["geneval"]["tasks"])
        sections.append({"title": "GenEval strict accuracy per task", "fmt": ".3f",
                         "rows": [[t, {m: _num(summaries[m].get("geneval", {}).get("tasks", {}).get(t))
                                       for m in labels}] for t in tasks]})
    if groups:
        what = "task" if first.get("group_key") == "tag" else (first.get("group_key") or "group")
        counts = {g: next((s["groups"][g]["n_prompts"] for s in summaries.values() if g in (s.get("groups") or {})), 0)
                  for g in groups}
        for label, col in reward_columns.items():
            sections.append({"title": f"{label} per {what}", "fmt": ".4f",
                             "rows": [[f"{g} ({counts[g]} prompts)",
                                       {m: _num((summaries[m].get("groups") or {}).get(g, {}).get(col))
                                        for m in labels}] for g in groups]})
    return sections


def _fmt(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def _delta(v, b) -> float | None:
    return None if v is None or b is None else float(v) - float(b)


def _fmt_delta(d, fmt: str) -> str:
    if d is None or math.isnan(d):
        return "–"
    text = format(d, fmt)
    if float(text) == 0:  # no "-0.0000" / "+0.0000" for a difference below the shown precision
        return format(0.0, fmt)
    return ("+" if d > 0 else "") + text


def render_markdown(sections: list[dict], labels: list[str], base: str | None = "base") -> str:
    """Markdown tables, one column per model and, when ``base`` is one of ``labels``, a ``Δ <model>`` column (model
    minus base) after every other model."""
    base = base if base in labels else None
    out = []
    for sec in sections:
        fmt = sec["fmt"]
        head = ["", *[c for m in labels for c in ([m] if m == base or base is None else [m, f"Δ {m}"])]]
        lines = [f"### {sec['title']}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, vals in sec["rows"]:
            cells = []
            for m in labels:
                cells.append(_fmt(vals.get(m), fmt))
                if base is not None and m != base:
                    cells.append(_fmt_delta(_delta(vals.get(m), vals.get(base)), fmt))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def read_results(folder: str | Path) -> list[dict]:
    """The per-image records of an evaluation folder (its ``results.jsonl``, as :func:`flowrl.evaluation.evaluate`
    writes it); ``[]`` when the folder has none."""
    path = Path(folder) / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_prompt_means(records: list[dict], column: str) -> dict[int, float]:
    """``{prompt index: mean of column over that prompt's images}``."""
    acc: dict[int, list[float]] = {}
    for r in records:
        if column in r:
            acc.setdefault(int(r["prompt_index"]), []).append(float(r[column]))
    return {i: sum(v) / len(v) for i, v in acc.items()}


def paired_difference(base_records: list[dict], records: list[dict], column: str,
                      group_key: str | None = None) -> dict:
    """Mean difference ``model − base`` of ``column`` with its standard error, paired by prompt.

    Both evaluations must use the same prompts, images per prompt and seeds (:func:`flowrl.evaluation.evaluate`
    draws image ``k`` of prompt ``i`` from seed ``seed + i · images_per_prompt + k`` for every model), so the two
    images of a pair share their initial noise and differ only by the weights. The unit is the prompt: each prompt's
    difference is the mean over its images of model minus base; the standard error is the sample standard
    deviation of those per-prompt differences over ``√n`` (n = prompts in both record sets). Pairing by prompt removes
    the prompt-to-prompt spread (the large part of the variance of an unpaired comparison) and makes no assumption
    about the images of one prompt being independent.

    Args:
        base_records, records: per-image records (``results.jsonl`` lines) with ``prompt_index`` and ``column``.
        column: the reward column compared, e.g. ``"reward"``.
        group_key: record field to also report per group (``"tag"``, ``"category"``), or ``None``.

    Returns:
        ``{"column", "n_prompts", "base", "model", "mean", "se", "z", "groups": {group: {same keys}}}`` with
        ``base`` / ``model`` the means over the shared prompts, ``mean`` their difference and ``z = mean / se``
        (``se`` and ``z`` are NaN for fewer than 2 prompts or a zero spread).

    Raises:
        ValueError: the two record sets share no prompt with ``column`` (different prompt files, or a missing
            column); the message names what each side has.
    """
    b, m = per_prompt_means(base_records, column), per_prompt_means(records, column)
    shared = sorted(set(b) & set(m))
    if not shared:
        raise ValueError(f"paired_difference: no prompt has column {column!r} in both evaluations "
                         f"({len(b)} base prompts, {len(m)} model prompts with it); compare evaluations of the same "
                         "prompt file and reward")

    def stats(idx: list[int]) -> dict:
        d = [m[i] - b[i] for i in idx]
        n = len(d)
        mean = sum(d) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
        return {"column": column, "n_prompts": n, "base": sum(b[i] for i in idx) / n,
                "model": sum(m[i] for i in idx) / n, "mean": mean, "se": se,
                "z": mean / se if se and not math.isnan(se) else float("nan")}

    out = stats(shared)
    groups: dict[str, list[int]] = {}
    if group_key:
        group_of = {int(r["prompt_index"]): str(r.get(group_key, "")) for r in base_records}
        for i in shared:
            groups.setdefault(group_of[i], []).append(i)
    out["groups"] = {g: stats(idx) for g, idx in groups.items()} if len(groups) > 1 else {}
    return out


def render_paired_markdown(paired: dict[str, dict], base: str) -> str:
    """A markdown table of :func:`paired_difference` results, ``{model label: result}``: one row per model (and per
    group), with the base mean, the model mean, the paired difference ± its standard error and ``z``."""
    lines = [f"| model | prompts | {base} | model | Δ ± SE (paired by prompt) | z |", "|---|---|---|---|---|---|"]

    def row(name: str, r: dict) -> str:
        se = "–" if math.isnan(r["se"]) else f"{r['se']:.4f}"
        z = "–" if math.isnan(r["z"]) else f"{r['z']:+.1f}"
        return (f"| {name} | {r['n_prompts']} | {r['base']:.4f} | {r['model']:.4f} | "
                f"{_fmt_delta(r['mean'], '.4f')} ± {se} | {z} |")

    for label, r in paired.items():
        lines.append(row(label, r))
        lines += [row(f"{label} · {g}", gr) for g, gr in r.get("groups", {}).items()]
    return "\n".join(lines) + "\n"


def largest_changes(base_records: list[dict], records: list[dict], column: str, n: int = 5) -> dict[str, list]:
    """The ``n`` prompts whose mean ``column`` rose most and fell most against the base:
    ``{"up": [(prompt index, prompt, base, model)], "down": [...]}`` (unchanged prompts are left out)."""
    b, m = per_prompt_means(base_records, column), per_prompt_means(records, column)
    prompts = {int(r["prompt_index"]): r["prompt"] for r in base_records}
    diffs = sorted((m[i] - b[i], i) for i in b if i in m and m[i] != b[i])
    up = [(i, prompts[i], b[i], m[i]) for d, i in reversed(diffs[-n:]) if d > 0]
    down = [(i, prompts[i], b[i], m[i]) for d, i in diffs[:n] if d < 0]
    return {"up": up, "down": down}


def _sample_prompts(records: list[dict], group_key: str | None, k: int) -> list[int]:
    """Up to ``k`` prompt indices, taken in turn from each group (so every task / category shows)."""
    by: dict[str, list[int]] = {}
    seen = set()
    for r in records:
        i = int(r["prompt_index"])
        if i not in seen:
            seen.add(i)
            by.setdefault(str(r.get(group_key, "")) if group_key else "", []).append(i)
    out: list[int] = []
    queues = list(by.values())
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}.up{color:#0a7d22}.down{color:#b3261e}
.samples td{text-align:center;vertical-align:top}.samples td:first-child{text-align:left;max-width:22em}
.samples img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:auto}
.grid img{max-width:100%;image-rendering:pixelated}.small{color:#666;font-size:90%}code{background:#f5f5f5}
"""


def _td_delta(d, fmt: str) -> str:
    cls = "" if d is None or d == 0 or math.isnan(d) else (' class="up"' if d > 0 else ' class="down"')
    return f"<td{cls}>{html.escape(_fmt_delta(d, fmt))}</td>"


def render_html(sections: list[dict], models: list[dict], base: str | None, *, title: str, settings: dict,
                out_dir: Path, primary: tuple[str, str] | None = None, n_samples: int = 16,
                paired: dict[str, dict] | None = None) -> str:
    """The HTML report. ``models``: ``[{"label", "path", "dir"}]`` (``dir`` = the model's output folder);
    ``primary`` = ``(reward label, column)`` used for per-image captions and the largest per-prompt changes;
    ``paired``: :func:`paired_difference` results ``{model label: result}`` shown as their own table."""
    labels = [m["label"] for m in models]
    base = base if base in labels else None
    rel = {m["label"]: Path(os.path.relpath(m["dir"], out_dir)).as_posix() for m in models}
    records = {m["label"]: read_results(Path(m["dir"])) for m in models}
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{esc(title)}</h1>"]
    parts.append("<table>" + "".join(f"<tr><th>{esc(str(k))}</th><td style='text-align:left'>{esc(str(v))}</td></tr>"
                                      for k, v in settings.items()) + "</table>")
    parts.append("<h2>Models</h2><table><tr><th>model</th><th>weights</th><th>folder</th></tr>" + "".join(
        f"<tr><td>{esc(m['label'])}</td><td style='text-align:left'>{esc(str(m['path']))}</td>"
        f"<td style='text-align:left'><a href='{esc(rel[m['label']])}/'>{esc(rel[m['label']])}/</a></td></tr>"
        for m in models) + "</table>")
    for sec in sections:
        fmt = sec["fmt"]
        head = "".join(f"<th>{esc(m)}</th>" + (f"<th>Δ {esc(m)}</th>" if base and m != base else "") for m in labels)
        rows = []
        for name, vals in sec["rows"]:
            cells = ""
            for m in labels:
                cells += f"<td>{esc(_fmt(vals.get(m), fmt))}</td>"
                if base and m != base:
                    cells += _td_delta(_delta(vals.get(m), vals.get(base)), fmt)
            rows.append(f"<tr><td>{esc(str(name))}</td>{cells}</tr>")
        parts.append(f"<h2>{esc(sec['title'])}</h2><table><tr><th></th>{head}</tr>{''.join(rows)}</table>")
    if paired and base and primary:
        parts.append(f"<h2>Paired difference of {esc(primary[0])} vs {esc(base)}</h2><p class='small'>Images of "
                     "every model share their seeds; the standard error is over prompts (each prompt: the mean over "
                     "its images of model − base).</p><table><tr><th>model</th><th>prompts</th>"
                     f"<th>{esc(base)}</th><th>model</th><th>Δ</th><th>SE</th><th>z</th></tr>")
        for label, r in paired.items():
            for name, x in [(label, r)] + [(f"{label} · {g}", gr) for g, gr in r.get("groups", {}).items()]:
                parts.append(f"<tr><td>{esc(name)}</td><td>{x['n_prompts']}</td><td>{x['base']:.4f}</td>"
                             f"<td>{x['model']:.4f}</td>{_td_delta(x['mean'], '.4f')}<td>{_fmt(x['se'], '.4f')}</td>"
                             f"<td>{_fmt(x['z'], '+.1f')}</td></tr>")
        parts.append("</table>")
    if base and primary and records.get(base):
        label, col = primary
        for m in labels:
            if m == base or not records.get(m):
                continue
            ch = largest_changes(records[base], records[m], col)
            if not (ch["up"] or ch["down"]):
                continue
            parts.append(f"<h2>Largest per-prompt changes of {esc(label)}: {esc(m)} vs {esc(base)}</h2>"
                         "<table><tr><th>prompt</th><th>base</th><th>model</th><th>Δ</th><th>images</th></tr>")
            for i, prompt, b, v in ch["up"] + ch["down"]:
                img = "".join(f"<a href='{esc(rel[x])}/images/{i:05d}/samples/0000.png'>{esc(x)}</a> "
                              for x in (base, m))
                parts.append(f"<tr><td>{esc(prompt)}</td><td>{b:.4f}</td><td>{v:.4f}</td>"
                             f"{_td_delta(v - b, '.4f')}<td>{img}</td></tr>")
            parts.append("</table>")
    ref = next((records[m] for m in labels if records.get(m)), [])
    if ref:
        group_key = "category" if any("category" in r for r in ref) else ("tag" if any(r.get("tag") for r in ref)
                                                                          else None)
        idx = _sample_prompts(ref, group_key, n_samples)
        prompts = {int(r["prompt_index"]): r for r in ref if r["image_index"] == 0}
        vals = {m: {int(r["prompt_index"]): r for r in records[m] if r["image_index"] == 0} for m in labels}
        parts.append("<h2>Samples side by side</h2><p class='small'>First image of each prompt; every model uses the "
                     "same seed for it. The number is the image's "
                     f"{esc(primary[0]) if primary else 'reward'}.</p><table class='samples'><tr><th>prompt</th>"
                     + "".join(f"<th>{esc(m)}</th>" for m in labels) + "</tr>")
        for i in idx:
            r = prompts[i]
            tag = r.get("category") or r.get("tag") or ""
            cells = ""
            for m in labels:
                src = f"{rel[m]}/images/{i:05d}/samples/0000.png"
                v = vals[m].get(i, {}).get(primary[1] if primary else "reward")
                cap = "" if v is None else f"{v:.3f}"
                cells += f"<td><a href='{esc(src)}'><img src='{esc(src)}' alt=''></a>{cap}</td>"
            parts.append(f"<tr><td>{esc(r['prompt'])}<br><span class='small'>{esc(str(tag))}</span></td>{cells}</tr>")
        parts.append("</table>")
    parts.append("<h2>Grids</h2><p class='small'>First image of each prompt (up to 64), in prompt order.</p>")
    for m in labels:
        src = f"{rel[m]}/grid.png"
        parts.append(f"<h3>{esc(m)}</h3><div class='grid'><a href='{esc(src)}'><img src='{esc(src)}' alt='grid of "
                     f"{esc(m)}'></a></div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _paired_vs_base(models: list[dict], base: str | None, primary: tuple[str, str] | None,
                    group_key: str | None) -> dict[str, dict]:
    """:func:`paired_difference` of the primary reward column of every model against ``base``, read from the
    models' ``results.jsonl``; ``{}`` without a base, a primary reward or the records."""
    if not base or not primary:
        return {}
    base_records = read_results(next(m["dir"] for m in models if m["label"] == base))
    out = {}
    for m in models:
        records = read_results(m["dir"]) if m["label"] != base and base_records else []
        if records:
            out[m["label"]] = paired_difference(base_records, records, primary[1], group_key)
    return out


def _json_safe(obj):
    """``obj`` with NaN floats replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_report(out_dir: str | Path, models: list[dict], summaries: dict[str, dict], *, settings: dict,
                 base: str | None = "base", comparison: bool = True, title: str = "Benchmark evaluation") -> dict:
    """Write ``report.html`` and, with ``comparison``, ``comparison.md`` and ``comparison.json`` into ``out_dir``.

    Args:
        models: ``[{"label", "path", "dir"}]`` in column order (``path``: the weights evaluated; ``dir``: its output
            folder holding ``results.jsonl``, ``grid.png`` and ``images/``).
        summaries: ``{label: benchmark summary}`` (:func:`flowrl.evaluation.benchmark_summary`).
        settings: sampling settings and the prompt file, shown at the top and stored in the JSON.
        base: the label differences are taken against (ignored when absent).

    Returns:
        The comparison dict written to ``comparison.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [m["label"] for m in models]
    base = base if base in labels else None
    sections = summary_sections(summaries)
    first = summaries[labels[0]]
    primary = next(iter(first["reward_columns"].items()), None)
    md = render_markdown(sections, labels, base)
    paired = _paired_vs_base(models, base, primary, first.get("group_key"))
    if paired:
        md += (f"\n### Paired difference of {primary[0]} vs {base}\n\nImages of every model share their seeds; the "
               "standard error is over prompts (each prompt: the mean over its images of model − base).\n\n"
               + render_paired_markdown(paired, base))
    data = {
        "settings": settings, "base": base,
        "models": {m["label"]: {"path": str(m["path"]), "dir": Path(os.path.relpath(m["dir"], out)).as_posix(),
                                "summary": summaries[m["label"]]} for m in models},
        "tables": [{"title": s["title"], "rows": [
            {"name": name, "values": vals,
             **({"delta_vs_base": {m: _delta(vals.get(m), vals.get(base)) for m in labels if m != base}}
                if base else {})} for name, vals in s["rows"]]} for s in sections],
        "paired": _json_safe(paired),
    }
    if comparison:
        header = (f"# {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in settings.items()) + "\n"
                  + "".join(f"- model `{m['label']}`: {m['path']}\n" for m in models)
                  + (f"\nΔ = model − {base}.\n" if base else "") + "\n")
        (out / "comparison.md").write_text(header + md)
        (out / "comparison.json").write_text(json.dumps(data, indent=2))
    (out / "report.html").write_text(render_html(sections, models, base, title=title, settings=settings,
                                                 out_dir=out, primary=primary, paired=paired))
    return data
