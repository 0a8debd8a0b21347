"""Held-out evaluation of a VLM checkpoint on VQA records: greedy decoding, exact-match accuracy per task.

    python scripts/evaluate_vlm.py                                               # the embedded base model
    python scripts/evaluate_vlm.py --model runs/vlm_grpo/checkpoints/final --out runs/vlm_eval/trained
    python scripts/evaluate_vlm.py --model Qwen/Qwen2-VL-2B-Instruct --data my_vqa.jsonl --max-new-tokens 512

Writes ``results.jsonl`` (one row per record: completion, prediction, correct, format), ``summary.json`` and a
markdown table per task (``summary.md``); the last line printed is the overall accuracy.
"""

import argparse
import os
import sys
from pathlib import Path

os.chdir(Path(__file__).resolve().parent.parent)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-qwen2vl", help="folder or hub id (full model or LoRA adapter)")
    p.add_argument("--base", default=None, help="base model of a LoRA adapter folder (default: the adapter's own)")
    p.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--data", default="assets/vqa/vqa_test.jsonl")
    p.add_argument("--max-records", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="runs/vlm_eval/base")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import torch

    from flowrl.text.evaluation import evaluate_policy, write_report
    from flowrl.text.policy import VLMPolicy
    from flowrl.text.trainer import check_records, load_vlm
    from flowrl.text.vqa import read_jsonl

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = read_jsonl(args.data)
        check_records(records, args.data)
        adapter = Path(args.model) / "adapter_config.json"
        if adapter.is_file():
            import json

            from peft import PeftModel

            base = args.base or json.loads(adapter.read_text())["base_model_name_or_path"]
            model, processor = load_vlm(base, args.family)
            model = PeftModel.from_pretrained(model, args.model)
        else:
            model, processor = load_vlm(args.model, args.family)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.max_records:
        records = records[: args.max_records]
    policy = VLMPolicy(model.eval(), processor, max_new_tokens=args.max_new_tokens)
    res = evaluate_policy(policy, records, args.batch)
    out = write_report(res, args.out)
    print((out / "summary.md").read_text())
    print(f"accuracy: {res['summary']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
