"""Write the shapes domain's GenEval-format prompt files (deterministic; disjoint training / held-out splits).

    python scripts/make_prompts.py            # -> assets/prompts/shapes_{train,test,all}.jsonl
                                              #    and text_{pretrain,train,test}.jsonl (OCR prompts, signs)
"""

import argparse

from flowrl.shapes.prompts import all_metadata, split_metadata, write_jsonl
from flowrl.shapes.text import make_text_splits

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", default="assets/prompts")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    train, test = split_metadata(a.seed)
    write_jsonl(train, f"{a.out_dir}/shapes_train.jsonl")
    write_jsonl(test, f"{a.out_dir}/shapes_test.jsonl")
    write_jsonl(all_metadata(), f"{a.out_dir}/shapes_all.jsonl")
    print(f"train {len(train)} prompts, held-out {len(test)} prompts")
    text = make_text_splits(a.seed)
    for name, records in text.items():
        write_jsonl(records, f"{a.out_dir}/text_{name}.jsonl")
    print("text (OCR): " + ", ".join(f"{k} {len(v)} prompts" for k, v in text.items()))
