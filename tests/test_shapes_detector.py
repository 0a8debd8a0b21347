"""The classical shapes detector against freshly rendered ground truth (clean, blurred, noisy)."""

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from flowrl.geneval.scoring import evaluate_strict
from flowrl.shapes.detect import detect, detect_batch
from flowrl.shapes.prompts import all_metadata
from flowrl.shapes.render import BACKGROUND, COLORS, SHAPES, SceneObject, render_scene, scene_for_metadata

N_SCENES = 240


@pytest.fixture(scope="module")
def scenes():
    """``N_SCENES`` (metadata, objects, image) triples: every task, fixed seed."""
    rng = np.random.default_rng(1234)
    md = all_metadata()
    out = []
    for i in rng.choice(len(md), N_SCENES, replace=False):
        objs = scene_for_metadata(md[i], rng)
        out.append((md[i], objs, render_scene(objs)))
    return out


def blur(img, sigma=0.7):
    return np.clip(ndimage.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0)) + 0.5, 0, 255).astype(np.uint8)


def noise(img, rng, sigma=8.0):
    return np.clip(img + rng.normal(0, sigma, img.shape) + 0.5, 0, 255).astype(np.uint8)


def accuracy(items):
    """Per-object class/colour accuracy (objects matched to detections by centre distance), number of unmatched
    detections, and the fraction of images `evaluate_strict` scores correct against their own metadata."""
    n_obj = cls_ok = col_ok = extra = correct = 0
    for md, objs, img in items:
        dets = detect(img)
        used = set()
        for o in objs:
            dist = [np.hypot(*(d.center - (o.cx, o.cy))) if i not in used else np.inf for i, d in enumerate(dets)]
            n_obj += 1
            if dist and min(dist) < o.size / 2:
                j = int(np.argmin(dist))
                used.add(j)
                cls_ok += dets[j].cls == o.shape
                col_ok += dets[j].color == o.color
        extra += len(dets) - len(used)
        correct += evaluate_strict(md, dets)[0]
    return cls_ok / n_obj, col_ok / n_obj, extra, correct / len(items)


def test_clean_scenes_near_perfect(scenes):
    cls_acc, col_acc, extra, correct = accuracy(scenes)
    assert cls_acc >= 0.99 and col_acc >= 0.99, (cls_acc, col_acc)
    assert extra == 0
    assert correct >= 0.98, correct


def test_clean_renders_are_confident_and_boxes_accurate(scenes):
    for md, objs, img in scenes[:80]:
        dets = detect(img)
        assert len(dets) == len(objs)
        for d in dets:
            assert d.score > 0.9  # passes even GenEval's counting threshold
            assert d.mask.dtype == bool and d.mask.shape == img.shape[:2]
        for o in objs:
            d = min(dets, key=lambda d: np.hypot(*(d.center - (o.cx, o.cy))))
            assert np.hypot(*(d.center - (o.cx, o.cy))) < 1.0  # stars' tight box centre is ≤ 0.5 px off
            assert abs(d.dims[0] - o.size) < 1.5  # width of every shape spans (almost) its whole box
        masks = np.stack([d.mask for d in dets])
        assert masks.sum(0).max() <= 1  # disjoint


def test_blurred_scenes(scenes):
    cls_acc, col_acc, extra, correct = accuracy([(m, o, blur(i)) for m, o, i in scenes[:120]])
    assert cls_acc >= 0.98 and col_acc >= 0.98 and extra == 0, (cls_acc, col_acc, extra)
    assert correct >= 0.97, correct


def test_noisy_scenes(scenes):
    rng = np.random.default_rng(0)
    cls_acc, col_acc, extra, correct = accuracy([(m, o, noise(i, rng)) for m, o, i in scenes[:120]])
    assert cls_acc >= 0.98 and col_acc >= 0.98 and extra == 0, (cls_acc, col_acc, extra)
    assert correct >= 0.97, correct


def test_blank_and_noisy_blank_images_have_no_detections():
    blank = np.empty((64, 64, 3), dtype=np.uint8)
    blank[:] = BACKGROUND
    assert detect(blank) == []
    assert detect(noise(blank, np.random.default_rng(0), sigma=8.0)) == []
    assert detect_batch(np.stack([blank, blank])) == [[], []]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_and_colour(shape):
    for color in COLORS:
        dets = detect(render_scene([SceneObject(shape, color, 30.3, 33.6, 14.0)]))
        assert [(d.cls, d.color) for d in dets] == [(shape, color)]
        assert dets[0].score > 0.9


def test_touching_objects_of_different_colours_are_split():
    objs = [SceneObject("square", "red", 24, 32, 16), SceneObject("circle", "blue", 39.5, 32, 16)]
    dets = sorted(detect(render_scene(objs)), key=lambda d: d.center[0])
    assert [(d.cls, d.color) for d in dets] == [("square", "red"), ("circle", "blue")]
    assert all(d.score > 0.9 for d in dets)


def _draw(fn, size=64, s=4):
    img = Image.new("RGB", (size * s, size * s), BACKGROUND)
    fn(ImageDraw.Draw(img), s)
    return np.asarray(img.resize((size, size), Image.BOX))


def test_non_shapes_fall_below_geneval_threshold():
    blue = COLORS["blue"]
    cases = {
        "2:1 ellipse": lambda d, s: d.ellipse([16 * s, 26 * s, 48 * s, 42 * s], fill=blue),
        "2:1 rectangle": lambda d, s: d.rectangle([16 * s, 26 * s, 48 * s, 42 * s], fill=blue),
        "L shape": lambda d, s: (d.rectangle([22 * s, 22 * s, 28 * s, 42 * s], fill=blue),
                                 d.rectangle([22 * s, 36 * s, 42 * s, 42 * s], fill=blue)),
    }
    for name, fn in cases.items():
        assert all(d.score <= 0.3 for d in detect(_draw(fn))), name
    # Two touching squares of one colour merge into one region that fits no template.
    merged = render_scene([SceneObject("square", "red", 24, 32, 16), SceneObject("square", "red", 39.5, 32, 16)])
    assert all(d.score <= 0.3 for d in detect(merged))


def test_other_image_sizes():
    big = render_scene([SceneObject("star", "yellow", 64, 64, 40), SceneObject("triangle", "black", 30, 90, 30)],
                       image_size=128)
    assert sorted((d.cls, d.color) for d in detect(big)) == [("star", "yellow"), ("triangle", "black")]
    small = render_scene([SceneObject("circle", "green", 10, 10, 14)], image_size=20)
    assert [(d.cls, d.color) for d in detect(small)] == [("circle", "green")]
    # Non-square images work too.
    wide = np.concatenate([render_scene([SceneObject("square", "pink", 32, 32, 16)]), np.full((64, 32, 3), 128,
                                                                                             np.uint8)], axis=1)
    assert [(d.cls, d.color) for d in detect(wide)] == [("square", "pink")]


def test_input_validation_and_batch():
    img = render_scene([SceneObject("circle", "pink", 32, 32, 16)])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        detect(img[..., 0])
    with pytest.raises(ValueError, match="255"):
        detect(img.astype(np.float32) / 255)
    assert [(d.cls, d.color) for d in detect(img.astype(np.float32))] == [("circle", "pink")]
    batch = detect_batch([img, img[::-1]])
    assert len(batch) == 2 and all(len(b) == 1 for b in batch)
