"""Visual question answering about the shapes domain: questions, answers and reasoning strings for rendered scenes.

Each record is one scene and one question about it::

    {"image_seed": 12345, "objects": [{"shape": "star", "color": "red", "cx": 20.5, "cy": 31.0, "size": 15.2}, ...],
     "question": "How many red stars are there?", "answer": "2", "tag": "count"}

The image is not stored: :func:`render_record` re-renders it from ``objects`` with
:func:`~flowrl.shapes.render.render_scene`, so a JSON-lines file of thousands of records stays small.

Question families (``tag``), each built together with its scene so that the answers are balanced:

- ``count``: "How many red stars are there?" / "How many stars are there?" → ``"0"`` … ``"4"`` (uniform). Distractors
  are other shapes, or the same shape in another colour.
- ``color``: "What color is the triangle?" → one of the ten colour names; the scene holds exactly one triangle.
- ``shape``: "What shape is the green object?" → one of the four shapes; the scene holds exactly one green object.
- ``position``: "Is the red circle left of the blue square?" → ``"yes"``/``"no"`` (50/50); both objects are the only
  ones of their (colour, shape). The answer is :func:`~flowrl.shapes.render.relation_holds` with margin 0 (GenEval's
  rule); scenes are drawn so that a "yes" holds with margin 0.2 and a "no" fails even with margin -0.2 (no
  borderline cases).
- ``exists``: "Is there a purple star?" → ``"yes"``/``"no"`` (50/50); "no" scenes usually hold a near miss (a
  purple non-star or a star of another colour).

Tags cycle in a fixed order (index ``i`` gets ``TAGS[i % 5]``), so every split is balanced over tags. Chance accuracy
(uniform guessing within a tag) is ``(1/5 + 1/10 + 1/4 + 1/2 + 1/2) / 5 = 0.31``.

Splits: record ``i`` of split ``s`` with seed ``k`` has ``image_seed = 2·(k·SEED_STRIDE + i) + (s == "test")`` and
its scene, question and answer are a function of ``(image_seed, i)`` only; train seeds are even and held-out seeds
odd, so no held-out scene is ever generated for training, whatever the sizes and seeds.

The SFT target format is ``<think>REASONING</think><answer>ANSWER</answer>`` (:func:`target_text`);
:func:`parse_answer` extracts the answer from a generation and :func:`normalize_answer` puts it in canonical form
for exact-match scoring.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from flowrl.shapes.prompts import PLURALS, RELATIONS, load_json_lines, write_jsonl
from flowrl.shapes.render import COLORS, IMAGE_SIZE, SHAPES, SceneObject, _place, relation_holds, render_scene

__all__ = ["TAGS", "SPLITS", "SEED_STRIDE", "MAX_COUNT", "make_vqa", "make_record", "render_record",
           "objects_from_record", "normalize_answer", "parse_answer", "is_formatted", "reasoning_text", "target_text", "scene_key",
           "write_jsonl", "read_jsonl", "answer_space", "vocabulary_corpus"]

TAGS = ("count", "color", "shape", "position", "exists")
SPLITS = ("train", "test")
SEED_STRIDE = 10_000_000  # records per (seed, split) before the image seeds of seed k and k+1 would meet
MAX_COUNT = 4  # count answers are 0..MAX_COUNT
MAX_OBJECTS = 5  # objects per scene
POSITION_MARGIN = 0.2  # clearance of position scenes on the direction cosine (see module docstring)
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10", "none": "0"}
_ARTICLES = {"a", "an", "the"}
_COLORS = tuple(COLORS)


def answer_space(tag: str) -> tuple[str, ...]:
    """Every possible (normalised) answer of a question family.

    Raises:
        ValueError: on an unknown tag.
    """
    spaces = {"count": tuple(str(k) for k in range(MAX_COUNT + 1)), "color": _COLORS, "shape": SHAPES,
              "position": ("yes", "no"), "exists": ("yes", "no")}
    if tag not in spaces:
        raise ValueError(f"unknown VQA tag {tag!r}; expected one of {TAGS}")
    return spaces[tag]


# --------------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------------

def _round(o: SceneObject) -> SceneObject:
    # Records store two decimals; answers are computed from the rounded objects, so a re-render is exact.
    return SceneObject(o.shape, o.color, round(o.cx, 2), round(o.cy, 2), round(o.size, 2))


def _layout(rng: np.random.Generator, specs: list[tuple[str, str]], constraints: dict | None = None,
            attempts: int = 100) -> list[SceneObject]:
    """Place objects ``specs = [(shape, colour), ...]`` without overlap, in a random order in the returned list.

    ``constraints[j]`` is an optional ``f(obj, placed) -> bool`` for spec ``j`` (``placed``: the objects before it).
    """
    constraints = constraints or {}
    for _ in range(attempts):
        placed: list[SceneObject] = []
        for j, (shape, color) in enumerate(specs):
            c = constraints.get(j)
            o = _place(rng, shape, color, placed, IMAGE_SIZE, None if c is None else (lambda o, c=c: c(o, placed)))
            if o is None:
                break
            placed.append(_round(o))
        else:
            return [placed[k] for k in rng.permutation(len(placed))]
    raise RuntimeError(f"could not lay out {specs} in {attempts} attempts")


def _choice(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _other(rng: np.random.Generator, items, exclude):
    return _choice(rng, [x for x in items if x != exclude])


def _distractor_specs(rng: np.random.Generator, n: int, ok) -> list[tuple[str, str]]:
    """``n`` random (shape, colour) pairs satisfying ``ok(shape, colour)``."""
    pool = [(s, c) for s in SHAPES for c in _COLORS if ok(s, c)]
    return [_choice(rng, pool) for _ in range(n)]


def _count(rng: np.random.Generator) -> tuple[list[SceneObject], str, str]:
    k = int(rng.integers(MAX_COUNT + 1))
    shape = _choice(rng, SHAPES)
    color = _choice(rng, _COLORS) if rng.random() < 0.5 else None
    n_dis = int(rng.integers(1 if k == 0 else 0, MAX_OBJECTS - k + 1))
    targets = [(shape, color or _choice(rng, _COLORS)) for _ in range(k)]
    if color is None:
        dis = _distractor_specs(rng, n_dis, lambda s, c: s != shape)
    else:
        # Half of the distractors (on average) are near misses: the same shape in another colour.
        dis = [_choice(rng, [(shape, c) for c in _COLORS if c != color]) if rng.random() < 0.5
               else _choice(rng, [(s, c) for s in SHAPES for c in _COLORS if s != shape]) for _ in range(n_dis)]
    objs = _layout(rng, targets + dis)
    noun = PLURALS[shape] if color is None else f"{color} {PLURALS[shape]}"
    return objs, f"How many {noun} are there?", str(k)


def _color(rng: np.random.Generator) -> tuple[list[SceneObject], str, str]:
    shape, color = _choice(rng, SHAPES), _choice(rng, _COLORS)
    dis = _distractor_specs(rng, int(rng.integers(0, 4)), lambda s, c: s != shape)
    return _layout(rng, [(shape, color)] + dis), f"What color is the {shape}?", color


def _shape(rng: np.random.Generator) -> tuple[list[SceneObject], str, str]:
    shape, color = _choice(rng, SHAPES), _choice(rng, _COLORS)
    dis = _distractor_specs(rng, int(rng.integers(0, 4)), lambda s, c: c != color)
    return _layout(rng, [(shape, color)] + dis), f"What shape is the {color} object?", shape


def _position(rng: np.random.Generator) -> tuple[list[SceneObject], str, str]:
    a = (_choice(rng, SHAPES), _choice(rng, _COLORS))
    b = _choice(rng, [(s, c) for s in SHAPES for c in _COLORS if (s, c) != a])
    rel = _choice(rng, RELATIONS)
    yes = bool(rng.random() < 0.5)
    dis = _distractor_specs(rng, int(rng.integers(0, 3)), lambda s, c: (s, c) not in (a, b))

    def clear(o: SceneObject, placed: list[SceneObject]) -> bool:
        if yes:
            return relation_holds(o, placed[0], rel, margin=POSITION_MARGIN)
        return not relation_holds(o, placed[0], rel, margin=-POSITION_MARGIN)

    objs = _layout(rng, [b, a] + dis, constraints={1: clear})
    oa = next(o for o in objs if (o.shape, o.color) == a)
    ob = next(o for o in objs if (o.shape, o.color) == b)
    answer = "yes" if relation_holds(oa, ob, rel) else "no"
    return objs, f"Is the {a[1]} {a[0]} {rel} the {b[1]} {b[0]}?", answer


def _exists(rng: np.random.Generator) -> tuple[list[SceneObject], str, str]:
    shape, color = _choice(rng, SHAPES), _choice(rng, _COLORS)
    yes = bool(rng.random() < 0.5)
    n = int(rng.integers(1, 5))
    specs = [(shape, color)] if yes else []
    if not yes and rng.random() < 0.75:  # a near miss: right colour or right shape, not both
        near = (shape, _other(rng, _COLORS, color)) if rng.random() < 0.5 else (_other(rng, SHAPES, shape), color)
        specs.append(near)
    specs += _distractor_specs(rng, max(0, n - len(specs)), lambda s, c: (s, c) != (shape, color))
    objs = _layout(rng, specs)
    answer = "yes" if any((o.shape, o.color) == (shape, color) for o in objs) else "no"
    return objs, f"Is there {'an' if color[0] in 'aeiou' else 'a'} {color} {shape}?", answer


_MAKERS = {"count": _count, "color": _color, "shape": _shape, "position": _position, "exists": _exists}


def make_record(image_seed: int, tag: str) -> dict:
    """The VQA record of family ``tag`` for scene seed ``image_seed`` (deterministic).

    Raises:
        ValueError: on an unknown tag.
    """
    if tag not in _MAKERS:
        raise ValueError(f"unknown VQA tag {tag!r}; expected one of {TAGS}")
    rng = np.random.default_rng([int(image_seed), TAGS.index(tag)])
    objs, question, answer = _MAKERS[tag](rng)
    return {"image_seed": int(image_seed), "objects": [dict(shape=o.shape, color=o.color, cx=o.cx, cy=o.cy,
                                                            size=o.size) for o in objs],
            "question": question, "answer": answer, "tag": tag}


def make_vqa(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` VQA records of ``split`` (``"train"`` or ``"test"``), tags cycling through :data:`TAGS`.

    Record ``i`` has ``image_seed = 2·(seed·SEED_STRIDE + i) + (split == "test")``: train and held-out scenes come
    from disjoint seed sets (even/odd) for any ``n`` and ``seed``; see the module docstring.

    Raises:
        ValueError: on an unknown split, ``n < 0``, ``n > SEED_STRIDE`` or ``seed < 0``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= n <= SEED_STRIDE or seed < 0:
        raise ValueError(f"need 0 <= n <= {SEED_STRIDE} and seed >= 0 (got n={n}, seed={seed})")
    parity = SPLITS.index(split)
    return [make_record(2 * (seed * SEED_STRIDE + i) + parity, TAGS[i % len(TAGS)]) for i in range(n)]


def objects_from_record(rec: dict) -> list[SceneObject]:
    """The record's scene as :class:`~flowrl.shapes.render.SceneObject` s."""
    return [SceneObject(o["shape"], o["color"], float(o["cx"]), float(o["cy"]), float(o["size"]))
            for o in rec["objects"]]


def render_record(rec: dict) -> np.ndarray:
    """Render a record's scene.

    Returns:
        ``uint8`` array ``[64, 64, 3]`` (RGB, 0–255), identical for every call.

    Raises:
        ValueError: on an unknown shape or colour in the record.
    """
    return render_scene(objects_from_record(rec))


def scene_key(rec: dict) -> tuple:
    """A hashable key of the record's scene (objects in a canonical order), to check that splits share no scene."""
    return tuple(sorted((o["shape"], o["color"], o["cx"], o["cy"], o["size"]) for o in rec["objects"]))


# --------------------------------------------------------------------------------------------------------------------
# Answers and targets
# --------------------------------------------------------------------------------------------------------------------

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer for exact-match scoring.

    Lower-cases, turns punctuation into spaces, drops the articles ``a``/``an``/``the``, maps number words
    (``"zero"`` … ``"ten"``, ``"none"``) to digits and collapses whitespace: ``" Two."`` → ``"2"``,
    ``"The Circle!"`` → ``"circle"``, ``"Yes"`` → ``"yes"``. ``None`` gives ``""``.
    """
    if text is None:
        return ""
    text = _PUNCT.sub(" ", str(text).lower())
    words = [w for w in text.split() if w not in _ARTICLES]
    text = " ".join(words)
    if text in NUMBER_WORDS:
        return NUMBER_WORDS[text]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_answer(text: str) -> str | None:
    """The content of the last complete ``<answer>…</answer>`` in a generation (stripped), or ``None`` if absent."""
    found = _ANSWER_RE.findall(text or "")
    return found[-1].strip() if found else None


FORMAT_RE = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)


def is_formatted(text: str) -> bool:
    """True if ``text`` is exactly ``<think>…</think><answer>…</answer>`` (non-empty parts; whitespace allowed between
    and around) — the reasoning format of the SFT targets and of DeepSeek-R1's format reward."""
    return bool(FORMAT_RE.match(text or ""))


def reasoning_text(rec: dict) -> str:
    """A short templated reasoning sentence for the record (the ``<think>`` part of the SFT target).

    Raises:
        ValueError: on an unknown tag.
    """
    tag, q, ans = rec["tag"], rec["question"], rec["answer"]
    if tag == "count":
        noun = q[len("How many "):-len(" are there?")]
        return f"I see {ans} {noun}."
    if tag == "color":
        shape = q[len("What color is the "):-1]
        return f"The {shape} is {ans}."
    if tag == "shape":
        color = q[len("What shape is the "):-len(" object?")]
        return f"The {color} object is a {ans}."
    if tag == "position":
        body = q[len("Is the "):-1]  # "red circle left of the blue square"
        for rel in RELATIONS:
            if f" {rel} the " in body:
                a, b = body.split(f" {rel} the ")
                return f"The {a} is {'' if ans == 'yes' else 'not '}{rel} the {b}."
        raise ValueError(f"no relation in position question {q!r}")
    if tag == "exists":
        thing = q[len("Is there "):-1]  # "a purple star"
        return f"I see {thing}." if ans == "yes" else f"I see no {thing.split(' ', 1)[1]}."
    raise ValueError(f"unknown VQA tag {tag!r}; expected one of {TAGS}")


def target_text(rec: dict) -> str:
    """The assistant target of SFT: ``<think>REASONING</think><answer>ANSWER</answer>``."""
    return f"<think>{reasoning_text(rec)}</think><answer>{rec['answer']}</answer>"


def vocabulary_corpus() -> list[str]:
    """Sentences covering every word the VQA questions, answers and reasoning strings can use (one example of each
    question form, for every shape, colour, count and relation). Used to train the tiny tokenizer."""
    lines = []
    for s in SHAPES:
        for c in _COLORS:
            art = "an" if c[0] in "aeiou" else "a"
            lines += [f"How many {c} {PLURALS[s]} are there?", f"What color is the {s}?",
                      f"What shape is the {c} object?", f"Is there {art} {c} {s}?", f"I see {art} {c} {s}.",
                      f"I see no {c} {s}.", f"The {s} is {c}.", f"The {c} object is a {s}."]
            for rel in RELATIONS:
                lines += [f"Is the {c} {s} {rel} the {c} {s}?", f"The {c} {s} is not {rel} the {c} {s}.",
                          f"The {c} {s} is {rel} the {c} {s}."]
        lines += [f"How many {PLURALS[s]} are there?"]
        for k in range(MAX_COUNT + 1):
            lines += [f"I see {k} {PLURALS[s]}.", f"{k}"]
    # Bare answers, as they appear right after the <answer> tag (no leading space).
    lines += [a for tag in TAGS for a in answer_space(tag)] + ["Yes.", "No."]
    return lines


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------

def _check_record(rec: dict) -> str | None:
    missing = [k for k in ("image_seed", "objects", "question", "answer", "tag") if k not in rec]
    return f"VQA record lacks {missing}" if missing else None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate VQA records written by :func:`write_jsonl`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a line that is not JSON or lacks a required key (the line number is given), or no records.
    """
    return load_json_lines(path, _check_record, " (write it with scripts/make_vqa.py)")
