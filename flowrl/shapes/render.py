"""Procedural scenes of the embedded "shapes" domain.

A scene is a list of :class:`SceneObject` (shape, colour name, centre, size) drawn with PIL at 4× resolution and
box-filtered down to ``IMAGE_SIZE`` × ``IMAGE_SIZE`` RGB (anti-aliased edges), on a plain mid-grey background.
Shapes are axis-aligned: circle, square, upright triangle and upright five-pointed star, each inscribed in a square
bounding box of side ``size`` pixels. Objects never overlap (bounding boxes are at least ``MIN_GAP`` pixels apart),
so every object of a clean render is one connected region.

:func:`scene_for_metadata` samples a scene that satisfies a GenEval metadata record (``include`` classes, counts,
colours and positions; see :mod:`flowrl.shapes.prompts`), which is how captioned pretraining data is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle", "star")
# GenEval's ten colour names, rendered as well-separated sRGB values (all far from the grey background).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 165, 50),
    "blue": (30, 70, 230),
    "purple": (135, 40, 185),
    "pink": (255, 135, 200),
    "brown": (120, 70, 25),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
MIN_SIZE, MAX_SIZE = 13, 21
MIN_GAP = 2
STAR_INNER_RATIO = 0.45


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of the keys of :data:`COLORS`.
        cx, cy: centre in pixels of the ``IMAGE_SIZE`` image (x to the right, y downwards).
        size: side of the square bounding box in pixels.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in pixels."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` inscribed in ``box`` (``None`` for a circle, which is an ellipse)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    if shape == "star":
        cx, r = (x0 + x1) / 2, (x1 - x0) / 2
        # Centre the star vertically in its box: its outer points span [-r, r·cos(36°)] around the centre.
        cy = (y0 + y1) / 2 + r * (1 - math.cos(math.pi / 5)) / 2
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * STAR_INNER_RATIO
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(objects: list[SceneObject], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``objects`` on the grey background.

    Returns:
        ``uint8`` array of shape ``[image_size, image_size, 3]`` (RGB, 0–255).

    Raises:
        ValueError: on an unknown shape or colour name.
    """
    s = SUPERSAMPLE
    img = Image.new("RGB", (image_size * s, image_size * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        if o.color not in COLORS:
            raise ValueError(f"unknown colour {o.color!r}; expected one of {tuple(COLORS)}")
        box = tuple(v * s for v in o.box)
        poly = shape_polygon(o.shape, box)
        if poly is None:
            draw.ellipse(box, fill=COLORS[o.color])
        else:
            draw.polygon(poly, fill=COLORS[o.color])
    img = img.resize((image_size, image_size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float = 0.0) -> bool:
    """Whether ``a`` stands ``relation`` (``left of``/``right of``/``above``/``below``) to ``b`` under GenEval's
    relative-position rule (threshold 0.1, see :func:`flowrl.geneval.scoring.relative_position`), with an extra
    ``margin`` on the direction cosine (0 reproduces the rule's 0.5) so rendered scenes are unambiguous."""
    from flowrl.geneval.scoring import relative_position

    rels = relative_position(
        (a.cx, a.cy), (a.size, a.size), (b.cx, b.cy), (b.size, b.size), threshold=0.1, cos_threshold=0.5 + margin
    )
    return relation in rels


def _disjoint(o: SceneObject, others: list[SceneObject]) -> bool:
    for p in others:
        if (abs(o.cx - p.cx) < (o.size + p.size) / 2 + MIN_GAP) and (abs(o.cy - p.cy) < (o.size + p.size) / 2 + MIN_GAP):
            return False
    return True


def _place(rng: np.random.Generator, shape: str, color: str, others: list[SceneObject], image_size: int,
           constraint=None, tries: int = 200) -> SceneObject | None:
    for _ in range(tries):
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        lo, hi = size / 2 + 1, image_size - size / 2 - 1
        o = SceneObject(shape, color, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size)
        if _disjoint(o, others) and (constraint is None or constraint(o)):
            return o
    return None


def scene_for_metadata(metadata: dict, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
                       max_attempts: int = 100) -> list[SceneObject]:
    """Sample a scene that satisfies a GenEval metadata record.

    Every ``include`` entry contributes exactly ``count`` objects of its ``class`` (with its ``color`` if given,
    otherwise a uniformly random colour per object); an entry with ``"position": [relation, j]`` is placed so that
    it stands in that relation to every object of entry ``j`` (with a safety margin). Excludes are satisfied
    because nothing else is drawn.

    Raises:
        ValueError: on an unknown class/colour, or if no layout is found in ``max_attempts`` tries.
    """
    colors = list(COLORS)
    for attempt in range(max_attempts):
        placed: list[list[SceneObject]] = []
        ok = True
        for entry in metadata["include"]:
            cls = entry["class"]
            if cls not in SHAPES:
                raise ValueError(f"unknown class {cls!r}; the shapes domain has {SHAPES}")
            group: list[SceneObject] = []
            constraint = None
            if "position" in entry:
                rel, j = entry["position"]
                targets = placed[j]
                constraint = lambda o, t=targets, r=rel: all(relation_holds(o, b, r, margin=0.2) for b in t)
            for _ in range(entry["count"]):
                color = entry.get("color") or colors[rng.integers(len(colors))]
                flat = [o for g in placed for o in g] + group
                o = _place(rng, cls, color, flat, image_size, constraint)
                if o is None:
                    ok = False
                    break
                group.append(o)
            if not ok:
                break
            placed.append(group)
        if ok:
            objs = [o for g in placed for o in g]
            order = rng.permutation(len(objs))
            return [objs[i] for i in order]
    raise ValueError(f"could not lay out a scene for {metadata.get('prompt', metadata)!r} in {max_attempts} attempts")
