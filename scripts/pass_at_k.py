"""Headroom of a model on a GenEval-style evaluation: pass@1 and pass@k per task from an evaluation's results.

    python scripts/evaluate.py --out runs/eval/base_v2                 # 4 images per prompt (the default protocol)
    python scripts/pass_at_k.py runs/eval/base_v2                      # pass@1 / pass@4 per task, task means
    python scripts/pass_at_k.py runs/eval/base_v2 --confidence         # + shapes-detector confidence statistics

pass@1 of a prompt is the share of its images that are strictly correct; pass@k (k = images per prompt) is 1 if any
of them is. Task figures average over the task's prompts and the overall figure over tasks (GenEval's protocol), so
pass@k − pass@1 bounds what an update that always picked the best of k samples could gain. ``--confidence`` re-runs
the shapes detector (:func:`flowrl.shapes.detect.detect`) on the saved images and prints the share of detections
at or above GenEval's counting threshold (0.9) and the median confidence.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dir", help="an evaluate.py output folder (results.jsonl, images/)")
    p.add_argument("--confidence", action="store_true")
    a = p.parse_args()
    d = Path(a.eval_dir)
    by = defaultdict(lambda: defaultdict(list))
    for line in (d / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        by[r["tag"]][r["prompt_index"]].append(float(r["strict"]))
    p1s, pks = [], []
    print("| task | pass@1 | pass@k |\n|---|---|---|")
    for tag, prompts in by.items():
        p1 = sum(sum(v) / len(v) for v in prompts.values()) / len(prompts)
        pk = sum(max(v) for v in prompts.values()) / len(prompts)
        p1s.append(p1)
        pks.append(pk)
        print(f"| {tag} | {p1:.3f} | {pk:.3f} |")
    print(f"| **mean** | {sum(p1s) / len(p1s):.3f} | {sum(pks) / len(pks):.3f} |")
    if a.confidence:
        import numpy as np
        from PIL import Image

        from flowrl.geneval.scoring import COUNTING_THRESHOLD
        from flowrl.shapes.detect import detect

        scores = [x.score for f in sorted((d / "images").glob("*/samples/*.png"))
                  for x in detect(np.asarray(Image.open(f).convert("RGB")))]
        s = np.asarray(scores)
        print(f"{len(s)} detections: {np.mean(s >= COUNTING_THRESHOLD):.3f} at ≥ {COUNTING_THRESHOLD}, "
              f"median confidence {np.median(s):.3f}")


if __name__ == "__main__":
    main()
