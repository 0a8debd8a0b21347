"""Write the shapes-domain VQA splits used by ``scripts/pretrain_vlm.py`` (and later by VLM RL) as JSON lines.

Each line is one scene + one question (:mod:`flowrl.text.vqa`); images are re-rendered from the objects. Train and
held-out scenes come from disjoint seed sets (even / odd image seeds), tags are balanced (they cycle), and yes/no
answers are 50/50.

Run (the committed ``assets/vqa`` files are exactly this)::

    python scripts/make_vqa.py                      # assets/vqa/vqa_train.jsonl (10,000) + vqa_test.jsonl (1,000)
    python scripts/make_vqa.py --train-n 2000 --test-n 500 --out-dir /tmp/vqa
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from flowrl.text.vqa import TAGS, make_vqa, scene_key, write_jsonl

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "vqa"


def write_splits(out_dir: str | Path, train_n: int = 10_000, test_n: int = 1_000, seed: int = 0) -> tuple[Path, Path]:
    """Generate both splits, check they share no scene, write ``vqa_train.jsonl`` / ``vqa_test.jsonl``.

    Raises:
        RuntimeError: if a held-out scene also appears in the training split.
    """
    train, test = make_vqa(train_n, seed, "train"), make_vqa(test_n, seed, "test")
    shared = {scene_key(r) for r in train} & {scene_key(r) for r in test}
    if shared:
        raise RuntimeError(f"{len(shared)} scenes are in both splits")
    out_dir = Path(out_dir)
    paths = out_dir / "vqa_train.jsonl", out_dir / "vqa_test.jsonl"
    write_jsonl(train, paths[0])
    write_jsonl(test, paths[1])
    for name, recs in (("train", train), ("test", test)):
        answers = collections.Counter((r["tag"], r["answer"]) for r in recs)
        yes = {t: answers[(t, "yes")] / max(1, answers[(t, "yes")] + answers[(t, "no")])
               for t in ("position", "exists")}
        print(f"{name}: {len(recs)} records, tags {dict(collections.Counter(r['tag'] for r in recs))}, "
              f"yes share {yes}")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(DEFAULT_DIR))
    ap.add_argument("--train-n", type=int, default=10_000)
    ap.add_argument("--test-n", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.train_n % len(TAGS) or args.test_n % len(TAGS):
        print(f"note: sizes not multiples of {len(TAGS)}; tags are balanced up to one record")
    for p in write_splits(args.out_dir, args.train_n, args.test_n, args.seed):
        print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
