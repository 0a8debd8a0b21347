"""Benchmark prompt files: GenEval metadata, OCR prompts and plain prompt lists, read and told apart.

Three kinds of file are understood (:data:`KINDS`):

``geneval``
    GenEval metadata, one JSON object per line with ``prompt``, ``tag`` and ``include`` (the official
    ``evaluation_metadata.jsonl`` and ``assets/prompts/*.jsonl``). Scored by a GenEval reward (strict / partial per
    task); records are passed to the reward unchanged.
``ocr``
    Text-rendering prompts in Flow-GRPO's OCR format: one prompt per line (``.txt``) or JSON lines / CSV with a
    ``prompt`` field, the text to render written in double quotes inside the prompt
    (``A sign that says "HELLO"``). The quoted text becomes the record's ``text`` (what an OCR reward compares the
    recognised text with); Flow-GRPO's OCR reward takes the text between the first pair of double quotes, and so
    does :func:`quoted_text`.
``plain``
    Any other prompt list (DrawBench style): a ``.txt`` with one prompt per line, or a CSV / JSON lines / JSON array
    with a ``prompt`` (or ``Prompts`` / ``caption``) column and an optional ``category`` column. Scored by
    preference rewards; means are also given per category.

:func:`load_prompt_set` reads a file, detects its kind (:func:`detect_kind`: GenEval when the first record has
``tag`` and ``include``, OCR when every prompt has quoted text, plain otherwise) unless a kind is forced, and
normalises the records. Every error names the file and, where it applies, the line.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("geneval", "ocr", "plain")
PROMPT_KEYS = ("prompt", "prompts", "caption")
CATEGORY_KEYS = ("category", "categories")
UNCATEGORIZED = "uncategorized"
# Straight double quotes (Flow-GRPO's format) or typographic ones.
_QUOTED = re.compile(r'"([^"\n]*)"|\u201c([^\u201d\n]*)\u201d')


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes in ``prompt`` (stripped), or ``None`` if there is none or it
    is blank. ``'A sign that says "HELLO"'`` → ``"HELLO"``; typographic quotes (“…”) count too."""
    for m in _QUOTED.finditer(prompt):
        text = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        return text or None
    return None


@dataclass
class PromptSet:
    """A loaded prompt file.

    Attributes:
        kind: one of :data:`KINDS`.
        records: one dict per prompt, each with a string ``prompt``. GenEval: the metadata records unchanged. OCR:
            ``text`` (the quoted target text) added. Plain/OCR: ``category`` when the file has a category column
            (every record then has one; a blank one is ``"uncategorized"``), or the GenEval ``tag`` when a GenEval
            file is read with ``kind="plain"`` / ``"ocr"``.
        path: the file read.
        reason: why this kind was chosen (shown to the user).
        group_key: the record field the report groups by (``"tag"`` for GenEval, ``"category"`` when present).
    """

    kind: str
    records: list[dict]
    path: Path
    reason: str = ""
    group_key: str | None = None
    lines: list[int] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.records)


def _lookup(rec: dict, keys: tuple[str, ...]):
    low = {str(k).lower(): k for k in rec}
    for k in keys:
        if k in low:
            return low[k], rec[low[k]]
    return None, None


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, raw record)`` pairs of a prompt file; a bare prompt becomes ``{"prompt": ...}``."""
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    stripped = text.lstrip()
    rows: list[tuple[int, dict]] = []
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if reader.fieldnames is None:
            return []
        col, _ = _lookup({f: None for f in reader.fieldnames if f}, PROMPT_KEYS)
        if col is None:
            raise ValueError(f"{path}:1: the header {reader.fieldnames} has no prompt column "
                             f"(expected one of {list(PROMPT_KEYS)}, any case)")
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
        return rows
    if suffix == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        for i, item in enumerate(items, 1):
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict):
                raise ValueError(f"{path}: item {i} of the JSON array is neither a prompt string nor an object")
            rows.append((i, item))
        return rows
    as_json = suffix in (".jsonl", ".json", ".ndjson") or stripped.startswith("{")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if as_json:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if isinstance(rec, str):
                rec = {"prompt": rec}
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: each line must be a JSON object with a 'prompt' (or a JSON string)")
            rows.append((i, rec))
        else:
            rows.append((i, {"prompt": line.strip()}))
    return rows


def _is_geneval(rec: dict) -> bool:
    return "tag" in rec and "include" in rec


def detect_kind(records: list[dict]) -> tuple[str, str]:
    """``(kind, reason)`` for normalised records (each with a string ``prompt``)."""
    if records and _is_geneval(records[0]):
        return "geneval", "records have 'tag' and 'include'"
    if records and all(quoted_text(r["prompt"]) for r in records):
        return "ocr", "every prompt has its target text in double quotes"
    n = sum(quoted_text(r["prompt"]) is not None for r in records)
    extra = f"; {n} of {len(records)} prompts have quoted text, pass --kind ocr to score them as OCR" if n else ""
    return "plain", f"prompt list{extra}"


def load_prompt_set(path: str | Path, kind: str | None = None) -> PromptSet:
    """Read a prompt file, detect its kind (or use ``kind``) and normalise its records (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown ``kind``; an empty file; a malformed line (bad JSON, no prompt column, a blank or
            non-string prompt), a GenEval record without ``tag``/``include``, or an OCR prompt without quoted
            text — each naming ``path:line``.
    """
    from flowrl.shapes.prompts import _check_metadata

    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown prompt-file kind {kind!r}; choose one of {list(KINDS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} is not a file")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    records, lines = [], []
    for line, raw in rows:
        key, prompt = _lookup(raw, PROMPT_KEYS)
        if key is None:
            raise ValueError(f"{path}:{line}: no prompt field (expected one of {list(PROMPT_KEYS)}; "
                             f"got keys {sorted(map(str, raw))})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{line}: the prompt must be a non-empty string, got {prompt!r}")
        rec = dict(raw)
        if key != "prompt":
            del rec[key]
        rec["prompt"] = prompt if _is_geneval(raw) else prompt.strip()
        records.append(rec)
        lines.append(line)
    reason = "forced with --kind"
    if kind is None:
        kind, reason = detect_kind(records)
    group_key = None
    if kind == "geneval":
        for line, rec in zip(lines, records):
            err = _check_metadata(rec)
            if err:
                raise ValueError(f"{path}:{line}: {err}")
        group_key = "tag"
    else:
        has_cat = any(_lookup(r, CATEGORY_KEYS)[0] is not None for r in records)
        use_tag = not has_cat and all(isinstance(r.get("tag"), str) for r in records)  # GenEval file read as plain
        for line, rec in zip(lines, records):
            if use_tag:
                rec["category"] = rec["tag"]
            elif has_cat:
                ckey, cat = _lookup(rec, CATEGORY_KEYS)
                if ckey is not None and ckey != "category":
                    del rec[ckey]
                rec["category"] = str(cat).strip() if cat is not None and str(cat).strip() else UNCATEGORIZED
            if kind == "ocr":
                text = quoted_text(rec["prompt"])
                if text is None:
                    raise ValueError(f"{path}:{line}: OCR prompt has no target text in double quotes: "
                                     f"{rec['prompt']!r} (write it as: A sign that says \"HELLO\")")
                rec["text"] = text
        group_key = "category" if has_cat or use_tag else None
    return PromptSet(kind=kind, records=records, path=path, reason=reason, group_key=group_key, lines=lines)
