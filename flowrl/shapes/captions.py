"""Caption truth and hard-negative captions for the shapes domain (contrastive image-text training and evaluation).

:func:`caption_holds` decides whether a GenEval metadata record describes a rendered scene, straight from the scene's
objects (no detector). :func:`hard_negatives` builds, for a record, the captions of the same template with one
attribute changed (shape, colour, count, relation, argument order, or the two objects' colours swapped) — the
compositional hard negatives of NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models behave like
bags-of-words", arXiv 2210.01936), here exhaustive because the domain's grammar is tiny. Every negative is itself a
record of :func:`flowrl.shapes.prompts.all_metadata`, so its truth on a scene can be checked with
:func:`caption_holds` (a "negative" that happens to be true, e.g. a diagonal placement that is both ``left of`` and
``above``, is dropped).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from flowrl.geneval.scoring import POSITION_THRESHOLD, relative_position
from flowrl.shapes.prompts import NUMBERS, PLURALS, RELATIONS, _with_article, all_metadata, split_metadata
from flowrl.shapes.render import COLORS, SHAPES, SceneObject

# Kinds of hard negative, in the order they are listed by :func:`hard_negatives`.
NEGATIVE_KINDS = ("shape", "color", "count", "relation", "order", "color_swap")


@functools.lru_cache(maxsize=1)
def _records() -> dict[str, dict]:
    return {m["prompt"]: m for m in all_metadata()}


@functools.lru_cache(maxsize=1)
def held_out_prompts() -> frozenset[str]:
    """The 108 prompt strings of the held-out split (``assets/prompts/shapes_test.jsonl``,
    :func:`flowrl.shapes.prompts.split_metadata` with seed 0)."""
    return frozenset(m["prompt"] for m in split_metadata(0)[1])


def record(prompt: str) -> dict:
    """The metadata record of a domain prompt string.

    Raises:
        KeyError: if ``prompt`` is not one of the domain's 1,196 prompts.
    """
    return _records()[prompt]


def _counting(n: int, shape: str) -> str:
    return f"a photo of {_with_article(shape)}" if n == 1 else f"a photo of {NUMBERS[n]} {PLURALS[shape]}"


def _two(a: str, b: str, ca: str | None = None, cb: str | None = None) -> str:
    pa = _with_article(ca, a) if ca else _with_article(a)
    pb = _with_article(cb, b) if cb else _with_article(b)
    return f"a photo of {pa} and {pb}"


def _negative_prompts(m: dict) -> dict[str, list[str]]:
    tag, inc = m["tag"], m["include"]
    out: dict[str, list[str]] = {k: [] for k in NEGATIVE_KINDS}
    if tag in ("single_object", "counting"):
        a, n = inc[0]["class"], inc[0]["count"]
        out["shape"] = [_counting(n, s) for s in SHAPES if s != a]
        out["count"] = [_counting(k, a) for k in (1, *NUMBERS) if k != n]
    elif tag == "colors":
        a, c = inc[0]["class"], inc[0]["color"]
        out["shape"] = [f"a photo of {_with_article(c, s)}" for s in SHAPES if s != a]
        out["color"] = [f"a photo of {_with_article(k, a)}" for k in COLORS if k != c]
    elif tag in ("two_object", "color_attr"):
        a, b = inc[0]["class"], inc[1]["class"]
        ca, cb = inc[0].get("color"), inc[1].get("color")
        others = [s for s in SHAPES if s not in (a, b)]
        out["shape"] = [_two(s, b, ca, cb) for s in others] + [_two(a, s, ca, cb) for s in others]
        if tag == "color_attr":
            rest = [k for k in COLORS if k not in (ca, cb)]
            out["color"] = [_two(a, b, k, cb) for k in rest] + [_two(a, b, ca, k) for k in rest]
            # the binding test: same words, colours attached to the other shapes (in both word orders)
            out["color_swap"] = [_two(a, b, cb, ca), _two(b, a, ca, cb)]
    elif tag == "position":
        b, a = inc[0]["class"], inc[1]["class"]  # GenEval order: target first; the prompt reads "a <a> <rel> a <b>"
        rel = inc[1]["position"][0]
        phrase = lambda x, r, y: f"a photo of {_with_article(x)} {r} {_with_article(y)}"  # noqa: E731
        others = [s for s in SHAPES if s not in (a, b)]
        out["shape"] = [phrase(s, rel, b) for s in others] + [phrase(a, rel, s) for s in others]
        out["relation"] = [phrase(a, r, b) for r in RELATIONS if r != rel]
        out["order"] = [phrase(b, rel, a)]  # arguments swapped: the opposite meaning with the same words
    else:
        raise ValueError(f"unknown tag {tag!r}")
    return out


def hard_negatives(metadata: dict, objects: Sequence[SceneObject] | None = None,
                   exclude: Iterable[str] = ()) -> dict[str, list[dict]]:
    """Hard-negative records for ``metadata``: the same template with one attribute changed.

    Kinds (keys of the result; empty lists for kinds that do not apply to the record's tag):

    * ``shape``: one shape replaced by another (every tag);
    * ``color``: one colour replaced (``colors``, ``color_attr``);
    * ``count``: the number changed among 1–4 (``single_object``, ``counting``);
    * ``relation``: the relation replaced by each of the other three (``position``; includes the flipped one);
    * ``order``: the two objects swapped around the relation (``position``);
    * ``color_swap``: the two objects' colours exchanged (``color_attr``), in both word orders.

    Args:
        metadata: a record of :func:`flowrl.shapes.prompts.all_metadata` (any of the six tags).
        objects: if given, negatives that are in fact true of this scene (:func:`caption_holds`) are dropped.
        exclude: prompt strings never to return (e.g. the held-out prompts during training).

    Returns:
        ``{kind: [record, ...]}`` with the kinds of :data:`NEGATIVE_KINDS`; no record equals ``metadata``.
    """
    exclude = set(exclude)
    out = {}
    for kind, prompts in _negative_prompts(metadata).items():
        recs = [record(p) for p in dict.fromkeys(prompts) if p != metadata["prompt"] and p not in exclude]
        if objects is not None:
            recs = [r for r in recs if not caption_holds(r, objects)]
        out[kind] = recs
    return out


def caption_holds(metadata: dict, objects: Sequence[SceneObject], threshold: float = POSITION_THRESHOLD) -> bool:
    """Whether the record ``metadata`` is a true caption of the scene ``objects``.

    GenEval's rules on the ground-truth objects: each include needs at least ``count`` objects of its class (of its
    colour, if given), and, with ``position: [rel, j]``, at least ``count`` of them standing in ``rel`` to every
    object matched by include ``j`` (GenEval's ``relative_position``, threshold 0.1); each exclude fails when there
    are ``count`` or more objects of its class. (GenEval checks colours on the ``count`` most confident
    detections; with several same-class objects this check asks only that enough of them have the colour.)

    Args:
        metadata: a GenEval metadata record (``include``, ``exclude``?).
        objects: the scene (:class:`flowrl.shapes.render.SceneObject` list).
        threshold: GenEval's position threshold ``c``.
    """
    groups: list[list[SceneObject]] = []
    for e in metadata["include"]:
        cand = [o for o in objects if o.shape == e["class"] and ("color" not in e or o.color == e["color"])]
        if "position" in e and len(cand) >= e["count"]:
            rel, j = e["position"]
            cand = [o for o in cand if all(
                rel in relative_position((o.cx, o.cy), (o.size, o.size), (t.cx, t.cy), (t.size, t.size), threshold)
                for t in groups[j])]
        if len(cand) < e["count"]:
            return False
        groups.append(cand)
    for e in metadata.get("exclude", []):
        if sum(o.shape == e["class"] for o in objects) >= e["count"]:
            return False
    return True
