"""GenEval-style prompts and metadata for the shapes domain.

Prompts follow GenEval's six task templates (``shared/REFERENCE.md`` §6) with the shapes domain's four classes and
GenEval's ten colours; metadata records have the keys and tags of the official ``evaluation_metadata.jsonl``
(``tag``, ``include`` [``class``, ``count``, ``color``?, ``position``?], ``exclude``?, ``prompt``).

:func:`all_metadata` enumerates every prompt of the domain; :func:`split_metadata` cuts it deterministically into a
training split and a disjoint held-out split (no prompt string in both). Because ``single_object`` has only four
prompts, all of them are held out; the other tasks are split within the task.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from flowrl.shapes.render import COLORS, SHAPES

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
# Held-out prompts per tag (the rest of each tag is the training split).
HELD_OUT = {"single_object": 4, "two_object": 6, "counting": 6, "colors": 20, "position": 24, "color_attr": 48}


def article(word: str) -> str:
    """``"an"`` before a vowel letter, else ``"a"`` (GenEval's rule)."""
    return "an" if word[0] in "aeiou" else "a"


def _with_article(*words: str) -> str:
    phrase = " ".join(words)
    return f"{article(phrase)} {phrase}"


def all_metadata() -> list[dict]:
    """Every prompt of the shapes domain as a GenEval metadata record, in a fixed order."""
    out: list[dict] = []
    for a in SHAPES:
        out.append({"tag": "single_object", "include": [{"class": a, "count": 1}],
                    "prompt": f"a photo of {_with_article(a)}"})
    for a, b in itertools.permutations(SHAPES, 2):
        out.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                    "prompt": f"a photo of {_with_article(a)} and {_with_article(b)}"})
    for a in SHAPES:
        for n, word in NUMBERS.items():
            out.append({"tag": "counting", "include": [{"class": a, "count": n}],
                        "exclude": [{"class": a, "count": n + 1}], "prompt": f"a photo of {word} {PLURALS[a]}"})
    for a in SHAPES:
        for c in COLORS:
            out.append({"tag": "colors", "include": [{"class": a, "count": 1, "color": c}],
                        "prompt": f"a photo of {_with_article(c, a)}"})
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            # As in GenEval: the target object comes first, the positioned object refers to it by index.
            out.append({"tag": "position",
                        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                        "prompt": f"a photo of {_with_article(a)} {rel} {_with_article(b)}"})
    for a, b in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.permutations(COLORS, 2):
            out.append({"tag": "color_attr",
                        "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                        "prompt": f"a photo of {_with_article(ca, a)} and {_with_article(cb, b)}"})
    return out


def split_metadata(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic ``(train, held_out)`` split of :func:`all_metadata`, disjoint in prompt strings.

    ``two_object`` pairs are split by order (each unordered pair has one order in each split).
    """
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[dict]] = {t: [] for t in TAGS}
    for m in all_metadata():
        by_tag[m["tag"]].append(m)
    train, test = [], []
    for tag in TAGS:
        items = by_tag[tag]
        if tag == "two_object":
            pairs: dict[frozenset, list[dict]] = {}
            for m in items:
                pairs.setdefault(frozenset(e["class"] for e in m["include"]), []).append(m)
            for ms in pairs.values():
                k = int(rng.integers(2))
                test.append(ms[k])
                train.append(ms[1 - k])
            continue
        order = rng.permutation(len(items))
        n = HELD_OUT[tag]
        test += [items[i] for i in sorted(order[:n])]
        train += [items[i] for i in sorted(order[n:])]
    return train, test


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write metadata records as JSON lines (one record per line, GenEval's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def load_json_lines(path: str | Path, check=None, missing_hint: str = "") -> list[dict]:
    """Read a JSON-lines file of records, naming the line of any bad record.

    Args:
        path: the file. check: optional ``f(record) -> str | None`` returning an error text for a bad record.
        missing_hint: appended to the not-found message (how to produce the file).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a line that is not a JSON object, a record ``check`` rejects (``path:line: message``), or an
            empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}{missing_hint}")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one record") from e
            err = "each line must be a JSON object" if not isinstance(rec, dict) else (check(rec) if check else None)
            if err:
                raise ValueError(f"{path}:{i}: {err}")
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def _check_metadata(rec: dict) -> str | None:
    if not isinstance(rec.get("prompt"), str):
        return "each record needs a string 'prompt' (GenEval metadata format)"
    missing = [k for k in ("tag", "include") if k not in rec]
    if missing:
        return (f"record for {rec['prompt']!r} lacks {missing}; GenEval metadata needs 'tag' and 'include' "
                "(see assets/prompts/*.jsonl)")
    return None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a GenEval metadata JSON-lines file (:func:`load_json_lines`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a line that is not JSON or a record without ``prompt``/``tag``/``include``, naming the line.
    """
    return load_json_lines(path, _check_metadata, " (prompt/metadata file)")


def sample_caption(rng: np.random.Generator, pool: list[dict] | None = None) -> dict:
    """A metadata record drawn with uniform task probability, then uniform within the task (pretraining data)."""
    pool = pool if pool is not None else _ALL
    by_tag = _by_tag(id(pool), pool)
    tags = [t for t in TAGS if by_tag.get(t)]
    items = by_tag[tags[rng.integers(len(tags))]]
    return items[rng.integers(len(items))]


_ALL = all_metadata()
_CACHE: dict[int, dict[str, list[dict]]] = {}


def _by_tag(key: int, pool: list[dict]) -> dict[str, list[dict]]:
    if key not in _CACHE:
        d: dict[str, list[dict]] = {}
        for m in pool:
            d.setdefault(m["tag"], []).append(m)
        _CACHE[key] = d
    return _CACHE[key]
