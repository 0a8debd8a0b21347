"""Flow-GRPO training entry point (Hydra + accelerate).

    accelerate launch scripts/train_flowgrpo.py                       # embedded shapes SD3 model, CPU, ~20 min
    accelerate launch scripts/train_flowgrpo.py trainer.epochs=5 sampler=cps algorithm.kl_beta=0
    accelerate launch --num_processes 8 scripts/train_flowgrpo.py +experiment=sd3_5_medium_geneval   # GPUs
    torchrun --nproc_per_node 2 scripts/train_flowgrpo.py             # 2 CPU ranks (gloo), data-parallel

Algorithmic choices (Flow-GRPO, arXiv 2505.05470): SDE sampler with exact per-step Gaussian log-probabilities
(averaged over dimensions), G images per prompt, group-relative advantages clamped to ±5, PPO clip on per-step
ratios, closed-form KL to the LoRA-disabled reference, LoRA on the joint-attention projections, AdamW, EMA weights for
evaluation, 10 steps to train and more (ODE) to evaluate. Output: progress bar (reward / KL / clip fraction),
TensorBoard logs, image grids, LoRA checkpoints (``pipeline.load_lora_weights``), held-out evaluation vs the base.
"""

import os
import sys
from pathlib import Path

# Run from the repository root so relative paths in configs (assets/...) resolve.
os.chdir(Path(__file__).resolve().parent.parent)

import hydra
from omegaconf import DictConfig

from flowrl.config import ConfigError, TrainConfig, register_configs, to_train_config

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from flowrl.trainer import Trainer

    try:
        train_cfg: TrainConfig = to_train_config(cfg)
        trainer = Trainer(train_cfg)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    trainer.run()


if __name__ == "__main__":
    main()
