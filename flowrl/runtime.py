"""Run plumbing shared by the image trainer (:mod:`flowrl.trainer`) and the VLM trainer (:mod:`flowrl.text.trainer`):
the run folder and the data-parallel gradient step. Pure torch + accelerate; no model library is imported."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def open_run_dir(out: Path, config: dict):
    """Create the run folder ``out``, write ``config.json`` (the resolved config) and return a TensorBoard
    ``SummaryWriter`` on ``out/tensorboard`` (call on the main process only)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return SummaryWriter(str(out / "tensorboard"))


def reduce_and_clip(acc, params: list[torch.nn.Parameter], max_norm: float, sharded: bool = False) -> float:
    """All-reduce the gradients of ``params`` over the ranks (mean; a parameter without a gradient on a rank counts
    as zeros, so every rank joins every collective), then clip them to global norm ``max_norm``.

    The trainers scale each rank's loss by ``world / global normaliser``, so the mean here is the gradient of the
    whole batch (what DDP gives); with one process nothing is communicated.

    ``sharded=True`` (FSDP2, :mod:`flowrl.fsdp`): the gradients are already reduce-scattered with a mean by FSDP's
    backward and each rank holds a shard, so there is no all-reduce here; the norm is taken over the shards of all
    ranks (:func:`flowrl.fsdp.clip_sharded_grads`).

    Returns:
        The pre-clip global gradient norm (``inf``/``nan`` if a gradient is non-finite: the caller must then not step).
    """
    if sharded:
        from flowrl.fsdp import clip_sharded_grads

        return clip_sharded_grads(params, max_norm)
    if acc.num_processes > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = acc.reduce(p.grad, reduction="mean")
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
