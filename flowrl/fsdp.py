"""FSDP2 for full fine-tuning of the denoiser (``model.lora_rank=0`` with ``trainer.fsdp=true`` or an ``accelerate
launch`` FSDP config): sharding, the gradient norm over shards, and full state dicts for checkpoints.

The trainer shards with ``torch.distributed.fsdp.fully_shard`` itself instead of ``accelerator.prepare``: accelerate
only turns its FSDP plugin on for GPU launches (on CPU an ``Accelerator(cpu=True)`` with an FSDP plugin is
``MULTI_CPU`` and ``prepare`` wraps the model in DDP), so calling ``fully_shard`` directly is the one path that runs
the same on the CPU test machine (gloo) and on GPUs (NCCL). When ``accelerate launch`` brings an FSDP plugin (the
``fsdp_*`` files in ``configs/accelerate``), its wrap classes and sharding strategy are read from it
(:func:`settings_from_plugin`).

Layout: every module whose class is in the wrap list (default: the elements of the denoiser's top-level
``ModuleList``\\ s — ``JointTransformerBlock`` for SD3, ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` for
FLUX, the down/up blocks of a UNet) is one FSDP unit, and the root holds the rest (embeddings, final norm and
projection). Parameters, gradients and AdamW moments are sharded (``FULL_SHARD``, ZeRO-3-like); gradients are
reduce-scattered with a mean over the ranks, which is what the trainer's own all-reduce computes for LoRA/DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FSDPSettings:
    """How the denoiser is sharded.

    Attributes:
        wrap_classes: class names that become FSDP units (empty: the elements of the root's ``ModuleList``\\ s).
        reshard_after_forward: free the gathered weights of a unit after its forward (``FULL_SHARD``) or keep them
            until the backward (``SHARD_GRAD_OP``: more memory, one all-gather less per unit and step).
        param_dtype: dtype the weights are all-gathered and computed in (``None``: the stored float32);
            ``trainer.mixed_precision=bf16|fp16`` sets it, gradients are still reduced in float32.
    """

    wrap_classes: list[str] = field(default_factory=list)
    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None


def settings_from_plugin(plugin, param_dtype: torch.dtype | None = None) -> FSDPSettings:
    """:class:`FSDPSettings` from accelerate's ``FullyShardedDataParallelPlugin`` (FSDP version 1 or 2, as built
    from an ``accelerate launch`` config's ``fsdp_*`` keys); ``plugin=None`` gives the defaults.

    Read: ``transformer_cls_names_to_wrap`` (``fsdp_transformer_layer_cls_to_wrap``) and the sharding strategy /
    ``reshard_after_forward`` (``FULL_SHARD`` → True, ``SHARD_GRAD_OP`` → False). Not used: the state-dict type
    (checkpoints are always a full state dict gathered on rank 0), prefetching, ``use_orig_params``,
    ``sync_module_states`` (every rank loads the same weights), activation checkpointing (use
    ``model.gradient_checkpointing``), accelerate's mixed-precision policy (``trainer.mixed_precision`` is used).

    Raises:
        ValueError: ``NO_SHARD`` / ``HYBRID_SHARD`` strategies or CPU offload of the parameters (not wired: the
            adapters put their inputs on the denoiser's device).
    """
    if plugin is None:
        return FSDPSettings(param_dtype=param_dtype)
    raf = getattr(plugin, "reshard_after_forward", True)
    if isinstance(raf, bool):
        reshard = raf
    else:
        name = str(getattr(raf, "name", raf)).upper()
        if name not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise ValueError(f"FSDP sharding strategy {name}: flowrl wires FULL_SHARD and SHARD_GRAD_OP (set "
                             "fsdp_sharding_strategy / fsdp_reshard_after_forward accordingly)")
        reshard = name == "FULL_SHARD"
    off = getattr(plugin, "cpu_offload", None)
    if bool(getattr(off, "offload_params", False)) or type(off).__name__ == "CPUOffloadPolicy" or off is True:
        raise ValueError("FSDP CPU offload of the parameters is not wired in flowrl (the adapters place their inputs "
                         "on the denoiser's device): set fsdp_offload_params: false")
    classes = list(getattr(plugin, "transformer_cls_names_to_wrap", None) or [])
    return FSDPSettings(wrap_classes=classes, reshard_after_forward=reshard, param_dtype=param_dtype)


def default_wrap_classes(module: torch.nn.Module) -> list[str]:
    """Class names of the elements of ``module``'s direct ``ModuleList`` children (its repeated blocks)."""
    names: list[str] = []
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            for m in child:
                if type(m).__name__ not in names:
                    names.append(type(m).__name__)
    return names


def shard_denoiser(module: torch.nn.Module, settings: FSDPSettings | None = None) -> torch.nn.Module:
    """Shard ``module`` in place with FSDP2: ``fully_shard`` on every submodule whose class name is in
    ``settings.wrap_classes`` (bottom-up), then on the root. Parameters become ``DTensor`` shards (dim 0 split over
    the ranks of the default process group); trainable ones must be collected again afterwards
    (``[p for p in module.parameters() if p.requires_grad]``) and the optimizer created on them.

    Every rank must then run the same sequence of forwards (and backwards) of ``module``: each unit all-gathers
    its weights in its forward and reduce-scatters its gradients in the backward.

    Returns:
        ``module`` (its class is now ``FSDP<Class>``, a subclass of the original one).

    Raises:
        RuntimeError: no process group, or a wrap class that ``module`` does not contain.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs a process group: launch with torchrun or accelerate launch (≥ 2 processes)")
    s = settings or FSDPSettings()
    classes = list(s.wrap_classes) or default_wrap_classes(module)
    kw = {}
    if s.param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=s.param_dtype, reduce_dtype=torch.float32)
    units = [m for m in module.modules() if m is not module and type(m).__name__ in classes]
    missing = [c for c in classes if not any(type(m).__name__ == c for m in units)]
    if missing:
        raise RuntimeError(f"FSDP wrap classes {missing} are not in the {type(module).__name__} (it has "
                           f"{default_wrap_classes(module)}); fix fsdp_transformer_layer_cls_to_wrap")
    for m in reversed(units):  # bottom-up: a nested unit is sharded before the unit that contains it
        fully_shard(m, reshard_after_forward=s.reshard_after_forward, **kw)
    fully_shard(module, **kw)
    return module


def is_sharded(module) -> bool:
    """True if ``module`` has been sharded by :func:`shard_denoiser` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of ``module`` (parameters and persistent buffers) as CPU tensors keyed by qualified name.

    Sharded module: collective (call on every rank); the full tensors are gathered on rank 0 and the other ranks get
    ``{}``. Plain module: copies of its tensors on CPU (never views of the live weights, which the EMA swap changes
    in place).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if is_sharded(module):
        return get_model_state_dict(module, options=_options(cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (:func:`full_state_dict`'s format) into ``module``, sharded or not.

    Sharded module: collective; only rank 0's ``state`` is read and broadcast (the other ranks may pass ``{}``).

    Raises:
        RuntimeError: missing or unexpected keys, or shapes that differ.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if is_sharded(module):
        set_model_state_dict(module, state, options=_options(broadcast_from_rank0=True))
    else:
        module.load_state_dict(state, strict=True)


def full_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names (not positions), as full CPU tensors: loadable with or without
    FSDP and for any number of ranks. Sharded module: collective, rank 0 gets the dict and the others ``{}``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`full_optimizer_state_dict` (collective when sharded: rank 0's ``state`` is broadcast)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    opts = _options(broadcast_from_rank0=True) if is_sharded(module) else _options()
    set_optimizer_state_dict(module, optimizer, state, options=opts)


def clip_sharded_grads(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of FSDP-sharded parameters to global norm ``max_norm``; no all-reduce of the gradients.

    The norm is over the whole (unsharded) gradient: each rank's shard norms are combined by the ``DTensor``
    reduction (one small all-reduce), so every rank gets the same number and scales its shards by the same factor
    (``torch.nn.utils.get_total_norm`` + ``clip_grads_with_norm_``). Parameters without a gradient are skipped
    (FSDP leaves them ``None`` on every rank alike).

    Returns:
        The pre-clip global norm (``inf``/``nan`` for a non-finite gradient; the caller must then not step).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)
