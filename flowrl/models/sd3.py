"""Stable Diffusion 3 / 3.5 adapter: everything flowrl needs to know about the SD3 family, and nothing more.

Model-specific facts owned here: the transformer takes ``timestep = σ·1000``; prompts are encoded by the pipeline's
own ``encode_prompt`` (two CLIP encoders + optional T5, zeros when T5 is absent); latents are de-normalised with the
VAE's ``scaling_factor`` / ``shift_factor`` before decoding; the σ grid comes from the pipeline's
``FlowMatchEulerDiscreteScheduler``; LoRA targets are the joint-attention projections (Flow-GRPO's choice).
Classifier-free guidance runs as one batched forward over ``[uncond; cond]``, exactly as the diffusers pipeline does,
so a noise level of 0 reproduces ``StableDiffusion3Pipeline.__call__`` for the same generators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class BatchedTensors:
    """Base of the prompt-embedding dataclasses of every adapter: all fields are tensors with the batch first, so
    indexing, repeating (a group of images per prompt) and concatenating act on every field alike."""

    def __getitem__(self, index):
        return type(self)(*(getattr(self, f.name)[index] for f in fields(self)))

    def repeat_interleave(self, n: int):
        """Each prompt repeated ``n`` times consecutively (a group of ``n`` images per prompt)."""
        return type(self)(*(getattr(self, f.name).repeat_interleave(n, 0) for f in fields(self)))

    @classmethod
    def cat(cls, parts: list):
        """The prompts of ``parts`` in order, as one batch."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


class PipelineFacts:
    """What every adapter does the same way on its diffusers ``pipeline``: the model facts (the denoiser
    ``transformer`` — the UNet adapter overrides it —, its device, the VAE's pixels per latent cell), the image-input
    check of ``encode_images``, and the policy plumbing (LoRA, full fine-tuning, the reference policy)."""

    @property
    def transformer(self):
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse an ``encode_images`` input that is not ``[B, 3, H, W]`` floats in [0, 1] of a size the adapter's
        :meth:`latent_shape` accepts.

        Raises:
            ValueError: naming what is wrong.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
            raise ValueError("images must be floats in [0, 1]")
        self.latent_shape(images.shape[2], images.shape[3])  # size check

    def add_lora(self, rank: int, alpha: float, target_modules: list[str] | None = None,
                 init_seed: int = 0) -> list[torch.nn.Parameter]:
        """Attach a peft LoRA adapter (named ``"default"``; Gaussian A, zero B, so the adapted model starts equal to
        the base) to the denoiser on ``target_modules`` (default: the adapter's ``lora_target_modules``) and return
        its trainable parameters. The reference policy is the same denoiser with the adapter disabled
        (:meth:`reference`), so no copy of the base weights is kept.

        Raises:
            ValueError (from peft): if no module matches ``target_modules``.
        """
        return attach_lora(self.transformer, rank, alpha, list(target_modules or self.lora_target_modules), init_seed)

    def add_full_finetune(self, modules: list[str] | None = None,
                          keep_reference: bool = True) -> list[torch.nn.Parameter]:
        """Make the denoiser's own weights trainable (float32 master weights), optionally keeping a frozen copy as
        the reference policy; see :func:`unfreeze_full`."""
        return unfreeze_full(self, modules, keep_reference)

    def reference(self):
        """Context manager in which the denoiser is the reference policy: LoRA disabled, or under full fine-tuning
        the frozen copy of the initial weights (:func:`reference_policy`)."""
        return reference_policy(self)


@dataclass
class PromptEmbeds(BatchedTensors):
    """Encoded prompts of the SD3 family.

    Attributes:
        prompt_embeds: ``[B, L, D]`` token embeddings (CLIP-L ⊕ CLIP-G features padded to D, then T5 tokens).
        pooled: ``[B, P]`` pooled CLIP embeddings.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor



def resolve_model_path(path: str) -> str:
    """Return ``path`` if it is a local diffusers folder or a hub id; raise a clear error for a missing local path.

    Raises:
        FileNotFoundError: if ``path`` looks local (exists as a parent, starts with ``.``/``/``, or is under
            ``assets/``) but has no ``model_index.json``.
    """
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.startswith("assets")
    if looks_local:
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model path {path!r} has no model_index.json. Point model.pretrained at a diffusers folder "
                "(e.g. assets/shapes-sd3) or a hub id such as stabilityai/stable-diffusion-3.5-medium.")
        return str(p)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(path, "model_index.json") is None:
            raise FileNotFoundError(f"{path!r} is not a local folder and is not in the hub cache (HF_HUB_OFFLINE=1)")
    return path


class SD3Adapter(PipelineFacts):
    """Velocity, prompt encoding, σ grid and decoding for a ``StableDiffusion3Pipeline``.

    Args:
        pipeline: a loaded ``diffusers.StableDiffusion3Pipeline`` (any SD3/SD3.5 checkpoint).
        max_sequence_length: T5 tokens (zeros when ``text_encoder_3`` is absent); the embedded model uses 0.
        dtype: compute dtype of the transformer (the sampler maths is float32 regardless).
    """

    family = "sd3"
    lora_target_modules = LORA_TARGET_MODULES
    denoiser_attr = "transformer"  # the pipeline component that is trained (LoRA or full fine-tuning)

    def __init__(self, pipeline, max_sequence_length: int = 256, dtype: torch.dtype = torch.float32):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype
        self._negative: dict[int, PromptEmbeds] = {}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        max_sequence_length: int = 256, load_t5: bool = True) -> "SD3Adapter":
        """Load with ``StableDiffusion3Pipeline.from_pretrained`` (the same call as for SD3.5-M).

        Raises:
            FileNotFoundError: for a local path without ``model_index.json`` (see :func:`resolve_model_path`).
        """
        from diffusers import StableDiffusion3Pipeline

        kwargs = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(resolve_model_path(path), torch_dtype=dtype, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
            if m is not None:
                m.requires_grad_(False)
        return cls(pipe, max_sequence_length=max_sequence_length, dtype=dtype)

    # -- model facts (transformer, device, vae_scale_factor: PipelineFacts) ----------------------------------------
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``[num_steps + 1]`` float32 σ grid of the pipeline's scheduler (shift included), ending at 0."""
        sched = self.pipeline.scheduler
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.detach().float().cpu().clone()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H/f, W/f)`` of the latents for an image of ``height × width`` pixels.

        Raises:
            ValueError: if the size is not a multiple of ``vae_scale_factor × patch_size``.
        """
        f = self.vae_scale_factor * self.transformer.config.patch_size
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this model, got {height}×{width}")
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """``[B, C, h, w]`` float32 initial latents, sample ``i`` drawn from ``generators[i]`` exactly as the
        pipeline's ``prepare_latents`` does."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype).float()

    # -- prompts -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode prompts with the pipeline's ``encode_prompt`` (no CFG duplication). Returns :class:`PromptEmbeds`."""
        emb, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(emb.to(self.dtype), pooled.to(self.dtype))

    def negative(self, batch: int) -> PromptEmbeds:
        """The empty-prompt embedding (SD3's default negative prompt) for ``batch`` samples, cached per batch size.

        It is encoded as a batch of ``batch`` empty prompts, as the pipeline does, because the text encoders'
        matrix products round differently for different batch sizes (~1e-7) and CFG must match the pipeline bit for
        bit."""
        if batch not in self._negative:
            self._negative[batch] = self.encode([""] * batch)
        return self._negative[batch]

    # -- the model -----------------------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity prediction ``v(x, σ)`` with classifier-free guidance.

        With ``guidance_scale > 1`` one forward runs on ``[uncond; cond]`` (2B) and returns
        ``v_u + g·(v_c - v_u)``, as ``StableDiffusion3Pipeline`` does; otherwise a single conditional forward.

        Args:
            x: ``[B, C, h, w]`` latents at σ.
            sigma: ``[B]`` noise levels in [0, 1] (the transformer sees ``σ·1000``).
            cond: :class:`PromptEmbeds` for the B samples.

        Returns:
            ``[B, C, h, w]`` float32 velocity.
        """
        timestep = sigma.to(self.device, torch.float32) * 1000
        x_in = x.to(self.dtype)
        if guidance_scale > 1.0:
            neg = self.negative(x.shape[0])
            out = self.transformer(
                hidden_states=torch.cat([x_in, x_in]), timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([neg.prompt_embeds, cond.prompt_embeds]),
                pooled_projections=torch.cat([neg.pooled, cond.pooled]), return_dict=False)[0]
            v_u, v_c = out.chunk(2)
            return (v_u + guidance_scale * (v_c - v_u)).float()
        out = self.transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                               pooled_projections=cond.pooled, return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` latents → ``[B, 3, H, W]`` float32 images in [0, 1] (as the pipeline's postprocess)."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd: ``[B, C, h, w]`` latents → ``[B, 3, H, W]`` float32 images in [0, 1] whose
        gradients flow back to ``latents`` (the VAE's own weights are frozen). Used by differentiable-reward
        fine-tuning (DRaFT / ReFL, :mod:`flowrl.draft`)."""
        vae = self.pipeline.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] → ``[B, C, H/f, W/f]`` float32 latents as the transformer sees them.

        The inverse of :meth:`decode`'s normalisation: pixels are mapped to [-1, 1], encoded by the VAE, and the
        latent is normalised with ``(z - shift_factor) · scaling_factor`` (as diffusers' SD3 training scripts do
        before noising). ``z`` is the posterior mean (deterministic, the usual choice for pre-encoded data) or, with
        ``generator``, a posterior sample.

        Raises:
            ValueError: not ``[B, 3, H, W]``, values outside [0, 1], or a size that is not a multiple of
                ``vae_scale_factor × patch_size`` (see :meth:`latent_shape`).
        """
        self.check_images(images)
        vae = self.pipeline.vae
        dist = vae.encode(images.to(self.device, vae.dtype) * 2 - 1).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        shift = vae.config.shift_factor or 0.0
        return ((z.float() - shift) * vae.config.scaling_factor).float()

    # -- LoRA ----------------------------------------------------------------------------------------------------
    def save_lora(self, directory: str | os.PathLike) -> None:
        """Save the LoRA so that ``StableDiffusion3Pipeline.load_lora_weights(directory)`` loads it."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer)
        # The adapter config (rank, alpha, targets) travels as safetensors metadata, so loading restores the scale α/r.
        meta = self.transformer.peft_config["default"].to_dict()
        StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=meta)


def attach_lora(transformer, rank: int, alpha: float, target_modules: list[str], init_seed: int = 0) -> list:
    """Attach a peft LoRA adapter (named ``"default"``, Gaussian init of A, zero B, scale ``alpha / rank``) to a
    diffusers transformer and return its trainable parameters (shared by every model adapter).

    Raises:
        ValueError (from peft): if no module matches ``target_modules``.
    """
    from peft import LoraConfig

    torch.manual_seed(init_seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=target_modules))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _cast_inputs_to_float32(module, args, kwargs):
    """Forward pre-hook of a float32 (fully fine-tuned) denoiser: floating-point tensor inputs that arrive in the
    stored dtype (the adapters cast latents and embeddings to ``adapter.dtype``) are cast to float32."""
    def cast(v):
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32 else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def unfreeze_full(adapter, modules: list[str] | None = None, keep_reference: bool = True) -> list:
    """Full fine-tuning of an adapter's denoiser (shared by the SD3, FLUX and UNet adapters; ``model.lora_rank=0``).

    The denoiser is ``adapter.pipeline.<adapter.denoiser_attr>`` (the transformer, or the UNet). With
    ``keep_reference`` a frozen deep copy of it is taken first, in the stored dtype (``model.dtype``), in ``eval()``
    mode and without gradients: the reference policy of :func:`reference_policy` (KL, DPO, the NFT anchor, the base
    evaluation). Then the live denoiser is cast to float32 (fp32 master weights; a forward pre-hook casts its
    floating-point inputs to float32, so the adapters' ``x.to(adapter.dtype)`` keeps working) and its parameters whose
    qualified name contains one of ``modules`` get gradients (all parameters when ``modules`` is empty). The text
    encoders and the VAE stay frozen.

    Args:
        adapter: an SD3/FLUX/UNet adapter (needs ``pipeline`` and ``denoiser_attr``).
        modules: name substrings to unfreeze (``model.full_finetune_modules``), e.g. ``["transformer_blocks"]``.
        keep_reference: keep the frozen copy (costs one denoiser in ``model.dtype``); without it,
            :func:`reference_policy` raises.

    Returns:
        The trainable float32 parameters, in ``named_parameters`` order.

    Raises:
        ValueError: the denoiser already carries a LoRA, or no parameter name contains any of ``modules`` (the
            message lists some names).
    """
    import copy

    den = getattr(adapter.pipeline, adapter.denoiser_attr)
    if getattr(den, "_hf_peft_config_loaded", False):
        raise ValueError("full fine-tuning of a denoiser that carries a LoRA: use one or the other (model.lora_rank)")
    adapter._frozen_reference = copy.deepcopy(den).eval().requires_grad_(False) if keep_reference else None
    adapter._full_finetune = True
    # float32 master weights in fresh memory: the loaded tensors may be views into the safetensors file's mapping,
    # whose alignment changes which CPU kernels run; fresh copies compute exactly as the (freshly copied) reference
    with torch.no_grad():
        for t in [*den.parameters(), *den.buffers()]:
            t.data = t.data.to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
    den.register_forward_pre_hook(_cast_inputs_to_float32, with_kwargs=True)
    mods = [m for m in (modules or []) if m]
    params = []
    for name, p in den.named_parameters():
        train = not mods or any(m in name for m in mods)
        p.requires_grad_(train)
        if train:
            params.append(p)
    if not params:
        names = [n for n, _ in den.named_parameters()]
        raise ValueError(f"model.full_finetune_modules={mods} matches no parameter of the "
                         f"{type(den).__name__}; parameter names look like {names[:3]} … {names[-2:]}")
    return params


def reference_policy(adapter):
    """Context manager in which the adapter's denoiser is the reference policy (the frozen initial model).

    LoRA: the same denoiser with its adapters disabled. Full fine-tuning (:func:`unfreeze_full`): the frozen copy is
    swapped in for the trained denoiser (``pipeline.<denoiser_attr>``) and the trained one is put back on exit, so
    the live weights are never the reference.

    Raises:
        RuntimeError: full fine-tuning without a kept reference copy (``keep_reference=False``).
    """
    if getattr(adapter, "_full_finetune", False):
        ref = getattr(adapter, "_frozen_reference", None)
        if ref is None:
            raise RuntimeError("full fine-tuning keeps no frozen reference copy in this run (it is kept only when "
                               "algorithm.kl_beta > 0, algorithm.nft_uncond_anchor > 0 or algorithm.name=dpo); the "
                               "live weights are not the reference policy")
        return _SwapDenoiser(adapter.pipeline, adapter.denoiser_attr, ref)
    return _AdaptersDisabled(getattr(adapter.pipeline, adapter.denoiser_attr))


def denoiser_class_name(module) -> str:
    """The diffusers class of a denoiser, also when FSDP2 has wrapped it (``FSDPSD3Transformer2DModel`` →
    ``SD3Transformer2DModel``)."""
    return next(c.__name__ for c in type(module).__mro__ if c.__module__.startswith("diffusers."))


def save_denoiser(module, directory: str | os.PathLike, state_dict: dict | None = None,
                  max_shard_size: str = "10GB") -> Path:
    """Write a denoiser as a diffusers model folder: ``config.json`` and ``diffusion_pytorch_model*.safetensors``
    (sharded with an index above ``max_shard_size``), so that ``<Class>.from_pretrained(directory)`` — e.g.
    ``SD3Transformer2DModel`` — loads it (``torch_dtype`` to choose the dtype; the file keeps the tensors' dtype).

    Args:
        module: the denoiser (plain or FSDP-sharded; only its config is read when ``state_dict`` is given).
        state_dict: the full state dict to write (e.g. gathered from FSDP shards); default ``module.state_dict()``.

    Returns:
        ``directory``.
    """
    import json

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = module.state_dict() if state_dict is None else state_dict
    config = json.loads(module.to_json_string())
    config["_class_name"] = denoiser_class_name(module)
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    split = split_torch_state_dict_into_shards(sd, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(d / filename), metadata={"format": "pt"})
    if split.is_sharded:  # the index diffusers' from_pretrained reads for a sharded checkpoint
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return d


def load_denoiser_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored by :func:`save_denoiser` (every ``diffusion_pytorch_model*.safetensors`` of the folder,
    merged), as CPU tensors in their stored dtype.

    Raises:
        FileNotFoundError: no such safetensors file in ``directory``.
    """
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no diffusion_pytorch_model*.safetensors (not a full fine-tuning "
                                "checkpoint folder)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def swapped_denoiser(adapter, module):
    """Context manager in which ``module`` is the adapter's denoiser (``pipeline.<adapter.denoiser_attr>``), e.g. a
    fully fine-tuned transformer loaded from a checkpoint; the previous one is put back on exit."""
    return _SwapDenoiser(adapter.pipeline, adapter.denoiser_attr, module)


class _SwapDenoiser:
    """Put ``module`` at ``pipeline.<attr>`` inside the block and restore the previous one after (bypassing the
    pipeline's config bookkeeping in ``DiffusionPipeline.__setattr__``)."""

    def __init__(self, pipeline, attr: str, module):
        self.pipeline, self.attr, self.module = pipeline, attr, module

    def __enter__(self):
        self.saved = getattr(self.pipeline, self.attr)
        object.__setattr__(self.pipeline, self.attr, self.module)
        return self.module

    def __exit__(self, *exc):
        object.__setattr__(self.pipeline, self.attr, self.saved)
        return False


class _AdaptersDisabled:
    def __init__(self, transformer):
        self.transformer = transformer

    def __enter__(self):
        if getattr(self.transformer, "_hf_peft_config_loaded", False):
            self.transformer.disable_adapters()
        return self.transformer

    def __exit__(self, *exc):
        if getattr(self.transformer, "_hf_peft_config_loaded", False):
            self.transformer.enable_adapters()
        return False
