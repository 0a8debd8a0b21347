"""DeepSpeed ZeRO-2 for full fine-tuning of the denoiser (``model.lora_rank=0`` with ``trainer.deepspeed_zero=2`` or
an ``accelerate launch`` DeepSpeed config): the engine, the settings read from accelerate, and the optimizer step.

ZeRO-2 partitions the AdamW moments (and the float32 master copy) and the gradients over the ranks; every rank keeps
the whole float32 weights (the denoiser's own parameters), so the adapters keep calling the raw module for their
forwards and checkpoints copy the weights on rank 0 as without it; each rank adds its optimizer partition
(:func:`save_optimizer_partition`), which a resume on as many ranks loads (:func:`load_optimizer_partition`). The
trainer keeps its own loop:

- ``managed_gradient_accumulation: false``: the engine does not count micro-batches; each :func:`backward` (the
  trainer's loss, already scaled by ``world / global normaliser``; ``scale_wrt_gas=False``) runs ZeRO-2's gradient
  hooks, which reduce each bucket of gradients into the owning rank's partition (a mean over the ranks, like the
  trainer's own all-reduce) and accumulate; ``engine.step()`` is the optimizer step (boundary).
- The engine clips by the global norm (``gradient_clipping = trainer.grad_clip``) and refuses a step whose
  gradient is non-finite (its overflow check); :func:`optimizer_step` returns that norm (``inf`` when refused).
- Every rank must run the same sequence of backwards (the bucket reductions are collectives): the trainer's FSDP
  lock-step (padding forwards, no skipping of zero-advantage samples) is on under ZeRO-2 too.

Imported lazily: ``deepspeed`` is an optional dependency (``pip install deepspeed`` / ``flowrl[deepspeed]``).
"""

from __future__ import annotations

import os

import torch


def require_deepspeed():
    """``import deepspeed``, or a clear start-up error telling how to install it."""
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("trainer.deepspeed_zero=2 (or an accelerate DeepSpeed config) needs DeepSpeed: "
                          "pip install deepspeed (or pip install 'flowrl[deepspeed]')") from e
    return deepspeed


def stage_from_accelerate(acc) -> int:
    """The ZeRO stage when launched by ``accelerate launch`` with a DeepSpeed config (0 otherwise): accelerate's
    DeepSpeed plugin if it built one, else the ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_DEEPSPEED_ZERO_STAGE``
    environment that ``accelerate launch`` exports."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        if stage is not None:
            return int(stage)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    return 0


def ds_config(stage: int, grad_clip: float, micro_batch: int, world: int) -> dict:
    """The DeepSpeed config: ZeRO ``stage``, float32 (the trainer autocasts its forwards itself, see
    ``trainer.mixed_precision``), the engine clips to ``grad_clip``, the trainer owns the accumulation boundary."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def initialize(module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """``deepspeed.initialize`` on the existing process group (``torch.distributed`` set up by accelerate/torchrun;
    gloo on CPU, NCCL on GPUs). Returns the engine; its ``optimizer`` is the ZeRO optimizer wrapping ``optimizer``."""
    deepspeed = require_deepspeed()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("DeepSpeed ZeRO needs a process group: launch with torchrun or accelerate launch")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def backward(engine, loss: torch.Tensor) -> None:
    """Back-propagate ``loss`` (already scaled by the trainer) through the engine: gradients are reduced into the
    ranks' partitions and accumulated until :func:`optimizer_step`."""
    engine.backward(loss, scale_wrt_gas=False)


def optimizer_step(engine) -> float:
    """The optimizer step of the engine (clip, AdamW on the partitions, all-gather the weights, zero the gradients).

    Returns:
        The pre-clip global gradient norm; ``inf``/``nan`` if a gradient was non-finite, in which case the engine did
        not apply the step (the weights are unchanged) and the caller must stop.
    """
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float("nan") if norm is None else float(norm)
    if not getattr(engine, "_step_applied", True):
        return float("inf")
    return norm


def restore_master_weights(engine) -> None:
    """After loading weights into the module (resume): copy them into ZeRO's float32 master partitions, which
    otherwise would overwrite them at the next step."""
    engine.optimizer._restore_from_bit16_weights()


def partition_file(folder, rank: int):
    """This rank's ZeRO-2 optimizer partition in a checkpoint folder: ``zero_optim_rank{rank}.pt``."""
    from pathlib import Path

    return Path(folder) / f"zero_optim_rank{rank}.pt"


def save_optimizer_partition(engine, folder, rank: int) -> None:
    """Write this rank's partition of the ZeRO optimizer (``engine.optimizer.state_dict()``: its AdamW moments and
    step, the float32 master partition, the clip/loss-scale settings) to :func:`partition_file`."""
    torch.save(engine.optimizer.state_dict(), partition_file(folder, rank))


def load_optimizer_partition(engine, folder, rank: int, world: int) -> None:
    """Load this rank's partition saved by :func:`save_optimizer_partition` under the same number of ranks (ZeRO's
    rigid checkpoint: each rank reads its own entry of the list), after the module's weights were loaded. The master
    partitions are refreshed from the module's (float32) weights, which equal the saved ones."""
    sd = torch.load(partition_file(folder, rank), map_location="cpu", weights_only=False)
    parts = [None] * world
    parts[rank] = sd
    engine.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=False)
