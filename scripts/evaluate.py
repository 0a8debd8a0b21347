"""Evaluate a base model or a LoRA checkpoint on GenEval-format metadata (ODE sampling, fixed seeds).

    python scripts/evaluate.py                                   # embedded base model on the held-out shapes prompts
    python scripts/evaluate.py --lora runs/flowgrpo/checkpoints/final/lora_ema --out runs/eval/trained
    python scripts/evaluate.py --model stabilityai/stable-diffusion-3.5-medium --t5 --max-sequence-length 256 \\
        --resolution 512 --metadata data/geneval/evaluation_metadata.jsonl --reward <real-image GenEval reward>

Writes ``results.jsonl`` (per image), ``summary.json``, ``summary.md`` (per-task table), ``grid.png`` and the official
evaluator's folder layout ``images/<NNNNN>/{metadata.jsonl,samples/<dddd>.png}`` into ``--out``; the last line printed
is the overall score. Image ``k`` of prompt ``i`` uses seed ``seed + i·N + k`` for every model, so runs compare.
"""

import argparse
import sys
from pathlib import Path



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-sd3", help="diffusers folder or hub id")
    p.add_argument("--lora", default=None, help="LoRA folder saved by training (pipeline.load_lora_weights format)")
    p.add_argument("--metadata", default="assets/prompts/shapes_test.jsonl")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reward", default="geneval_shapes")
    p.add_argument("--max-sequence-length", type=int, default=0)
    p.add_argument("--t5", action="store_true", help="load the T5 encoder (real SD3/SD3.5 checkpoints)")
    p.add_argument("--max-prompts", type=int, default=0)
    p.add_argument("--out", default="runs/eval/base")
    a = p.parse_args()

    from flowrl.evaluation import evaluate
    from flowrl.models.sd3 import SD3Adapter
    from flowrl.rewards import load_reward
    from flowrl.shapes.prompts import read_jsonl

    try:
        metadata = read_jsonl(a.metadata)
        adapter = SD3Adapter.from_pretrained(a.model, max_sequence_length=a.max_sequence_length, load_t5=a.t5)
        reward = load_reward(a.reward)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.lora:
        if not Path(a.lora).is_dir():
            print(f"error: LoRA folder {a.lora} not found", file=sys.stderr)
            sys.exit(2)
        adapter.pipeline.load_lora_weights(a.lora)
    if a.max_prompts:
        metadata = metadata[: a.max_prompts]
    s = evaluate(adapter, metadata, reward, images_per_prompt=a.images_per_prompt, steps=a.steps,
                 guidance_scale=a.cfg, resolution=a.resolution, seed=a.seed, batch=a.batch, out_dir=a.out,
                 progress=True)
    print((Path(a.out) / "summary.md").read_text())
    key = "overall" if "overall" in s else "reward"
    print(f"{key}: {s[key]:.4f}")


if __name__ == "__main__":
    main()
