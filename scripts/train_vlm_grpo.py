"""GRPO-family training of a vision-language model on verifiable rewards (Hydra + accelerate).

    accelerate launch scripts/train_vlm_grpo.py                          # embedded tiny Qwen2-VL, shapes VQA, CPU
    accelerate launch scripts/train_vlm_grpo.py algorithm=dapo trainer.epochs=50
    accelerate launch --num_processes 8 scripts/train_vlm_grpo.py model=qwen2_vl_2b data.train=... data.test=...
    torchrun --nproc_per_node 2 scripts/train_vlm_grpo.py                # 2 CPU ranks (gloo), data-parallel

Algorithmic choices: G completions per question sampled at temperature T (vision tokens never sampled), per-token
log-probs recomputed at the same temperature in float32 (ratio exactly 1 on-policy), group-relative advantages,
the shared core's policy losses / KL estimators / loss aggregation (a token is a step; the same code trains the
diffusion models), full fine-tuning of the language model for the tiny default, LoRA for real checkpoints, AdamW.
Output: progress bar (reward / accuracy / KL / clip fraction), TensorBoard logs, history.jsonl, checkpoints
(``save_pretrained``), held-out greedy accuracy per task before and after (``eval/comparison.md``).
"""

import os
import sys
from pathlib import Path

os.chdir(Path(__file__).resolve().parent.parent)

import hydra
from omegaconf import DictConfig

from flowrl.config import ConfigError
from flowrl.text.config import register_vlm_configs, to_vlm_config

register_vlm_configs()


@hydra.main(version_base="1.3", config_path="../configs/vlm", config_name="train")
def main(cfg: DictConfig) -> None:
    from flowrl.text.trainer import VLMTrainer

    try:
        trainer = VLMTrainer(to_vlm_config(cfg))
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    trainer.run()


if __name__ == "__main__":
    main()
