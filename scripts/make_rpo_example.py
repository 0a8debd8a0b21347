"""Write the RPO example of the embedded shapes domain: a "subject" and its prompts (``algorithm=rpo``).

The subject, called ``sks star`` in prompts, is one particular star: **orange, 28 px wide** (the shapes domain draws
objects of 13-21 px, so its plain captions cannot ask for this size), alone on the grey background. The base model
has never seen the token ``sks`` (its text encoders are frozen during RPO; the LoRA on the transformer has to bind
the token's embedding to the look). ``python scripts/make_rpo_example.py`` writes, deterministically:

- ``assets/rpo_subject/ref_{0..3}.png``: 4 reference images (64×64 RGB, :func:`flowrl.shapes.render.render_scene`),
  the star at 4 positions near the centre (so that position is not part of the subject);
- ``assets/prompts/rpo_subject.jsonl``: GenEval-style metadata lines (``prompt``, ``tag``, ``include``) with
  ``"split": "train"`` (the instance prompt ``a photo of a sks star`` and 11 compositions with one other shape) or
  ``"split": "val"`` (6 compositions that no training prompt uses; early stopping).

Train with (README, "RPO"):

    accelerate launch scripts/train_flowgrpo.py algorithm=rpo reward=lambda_harmonic sampler=ode ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SUBJECT_COLOR, SUBJECT_SIZE = "orange", 28.0
CENTRES = [(32.0, 32.0), (27.0, 30.0), (37.0, 33.0), (31.0, 37.0)]
TOKEN = "sks"
INSTANCE_PROMPT = f"a photo of a {TOKEN} star"
COMPANIONS = [("circle", "blue"), ("square", "red"), ("triangle", "green"), ("circle", "purple"),
              ("square", "yellow"), ("triangle", "white"), ("circle", "pink"), ("square", "black"),
              ("triangle", "blue"), ("circle", "green")]
RELATIONS = ["left of", "right of", "above", "below"]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def subject_records() -> list[dict]:
    """The prompt records: the instance prompt, then two-object and position compositions (train / val)."""
    star = {"class": "star", "count": 1, "color": SUBJECT_COLOR}
    recs = [{"tag": "rpo_single", "include": [star], "prompt": INSTANCE_PROMPT, "split": "train"}]
    comps = []
    for shape, color in COMPANIONS:
        other = {"class": shape, "count": 1, "color": color}
        comps.append({"tag": "rpo_two_object", "include": [star, other],
                      "prompt": f"a photo of a {TOKEN} star and {article(color)} {color} {shape}"})
    for j, (shape, color) in enumerate(COMPANIONS):
        rel = RELATIONS[j % len(RELATIONS)]
        other = {"class": shape, "count": 1, "color": color}
        comps.append({"tag": "rpo_position", "include": [other, {**star, "position": [rel, 0]}],
                      "prompt": f"a photo of a {TOKEN} star {rel} {article(color)} {color} {shape}"})
    order = np.random.default_rng(0).permutation(len(comps))
    for q, i in enumerate(order[:17]):
        recs.append({**comps[i], "split": "val" if q < 6 else "train"})
    return recs


def render_references(out: Path) -> list[Path]:
    from PIL import Image

    from flowrl.shapes.render import SceneObject, render_scene

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (cx, cy) in enumerate(CENTRES):
        img = render_scene([SceneObject("star", SUBJECT_COLOR, cx, cy, SUBJECT_SIZE)])
        p = out / f"ref_{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--references", default=str(ROOT / "assets" / "rpo_subject"))
    ap.add_argument("--prompts", default=str(ROOT / "assets" / "prompts" / "rpo_subject.jsonl"))
    args = ap.parse_args()
    paths = render_references(Path(args.references))
    recs = subject_records()
    Path(args.prompts).parent.mkdir(parents=True, exist_ok=True)
    Path(args.prompts).write_text("".join(json.dumps(r) + "\n" for r in recs))
    n_val = sum(r["split"] == "val" for r in recs)
    print(f"wrote {len(paths)} reference images to {args.references} and {len(recs)} prompts "
          f"({len(recs) - n_val} train, {n_val} val) to {args.prompts}")


if __name__ == "__main__":
    main()
