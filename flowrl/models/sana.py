"""SANA adapter: everything flowrl needs to know about ``diffusers.SanaPipeline`` checkpoints, and nothing more.

Model-specific facts owned here (upstream source: ``diffusers/pipelines/sana/pipeline_sana.py``,
``diffusers/models/transformers/sana_transformer.py``, ``diffusers/models/autoencoders/autoencoder_dc.py``,
diffusers 0.42):

- **Latents.** ``[B, C, H/f, W/f]`` with ``C = transformer.in_channels`` (32 for SANA) and ``f`` the DC-AE's
  down-sampling factor (``2^(len(encoder_block_out_channels) - 1)`` = 32 for SANA, hence 32×32 latents at 1024²).
  ``patch_size=1``: no packing. Image sizes must be multiples of 32 (``SanaPipeline.check_inputs``).
- **Velocity frame.** SANA is trained with rectified flow, ``x_σ = (1 - σ)·x0 + σ·ε``, and its transformer
  predicts ``v = ε - x0`` — the same frame as SD3. The published checkpoints ship a ``DPMSolverMultistepScheduler``
  with ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, whose data prediction is
  ``x0 = x_σ - σ·v`` (``convert_model_output``), i.e. exactly this convention; no sign flip or rescaling is needed.
- **Scheduler / σ grid.** flowrl's samplers are Euler(-Maruyama) steps on a σ grid that starts at 1. The
  DPM-Solver++ (2nd order, multistep) grid of the checkpoints starts at ``shift(1 - 1/1000)`` and its ODE steps are
  not Euler steps, so :class:`SanaAdapter` *replaces the pipeline's scheduler* by
  ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=flow_shift)`` (same static shift, 3.0 for SANA
  1600M). The σ grid is then ``shift(linspace(1, shift(1/1000), N))`` + a final 0 (the scheduler's default grid, as
  for SD3) and does not depend on the resolution; a
  noise level of 0 reproduces ``SanaPipeline.__call__`` with that (Euler) scheduler bit for bit.
- **Timestep.** The transformer takes ``t = σ·num_train_timesteps·timestep_scale`` (``timestep_scale`` is 1.0 for
  SANA; the pipeline multiplies the scheduler's ``timesteps`` by it), computed in float32 as the pipeline does.
- **Text.** A Gemma-2 decoder (``Gemma2Model``, its last hidden state ``[B, L, 2304]``) and an **attention mask**
  ``[B, L]``. The pipeline's ``encode_prompt`` prepends SANA's *complex human instruction* (the default list of
  ``SanaPipeline.__call__``, read from its signature here, never copied) to each prompt, tokenizes to
  ``len(instruction) + max_sequence_length - 2`` tokens (right padding) and keeps token 0 (``<bos>``) plus the last
  ``max_sequence_length - 1`` tokens, so every prompt yields ``L = max_sequence_length`` (300) features. The negative
  prompt (``""``) is encoded *without* the instruction. Both go through the pipeline's own ``encode_prompt``.
- **Guidance.** Classic CFG, one batched forward over ``[uncond; cond]`` (embeddings and masks concatenated),
  ``v_u + g·(v_c - v_u)`` in float32, as the pipeline; ``g ≤ 1`` is a single conditional forward.
- **VAE.** ``AutoencoderDC``; ``z / scaling_factor`` before decoding (0.41407 for SANA's DC-AE f32c32), no shift.
  Its encoder is deterministic (no posterior), so :meth:`SanaAdapter.encode_images` ignores ``generator``.
- **LoRA.** peft adapter on the attention projections of both attentions of every ``SanaTransformerBlock``
  (``attn1`` linear self-attention and ``attn2`` cross-attention: ``to_q/k/v``, ``to_out.0``); saved with
  ``SanaPipeline.save_lora_weights`` so that ``SanaPipeline.load_lora_weights`` reads it.

Not covered: SANA-Sprint (``guidance_embeds=True``, ``SanaSprintPipeline``, SCM consistency sampling) and the
``use_resolution_binning`` resize of the pipeline — flowrl samples exactly the requested size.

Velocity convention (the one :mod:`flowrl.flow.sde` expects): ``v ≈ ε - x0`` and the Euler step is
``x_{σ_next} = x_σ + (σ_next - σ)·v``, exactly ``FlowMatchEulerDiscreteScheduler.step``.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flowrl.models.sd3 import BatchedTensors, PipelineFacts, resolve_model_path

# Both attentions of SanaTransformerBlock (attn1: linear self-attention, attn2: cross-attention to the text).
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]

__all__ = ["SanaAdapter", "SanaPromptEmbeds", "LORA_TARGET_MODULES", "default_complex_human_instruction"]


@dataclass
class SanaPromptEmbeds(BatchedTensors):
    """Encoded prompts of the SANA family.

    Attributes:
        prompt_embeds: ``[B, L, D]`` Gemma-2 last hidden states (``L = max_sequence_length``, D = 2304 for SANA).
        attention_mask: ``[B, L]`` int64 mask of real (1) vs padding (0) tokens, fed to the transformer's
            cross-attention as ``encoder_attention_mask``.

    Same interface as :class:`~flowrl.models.sd3.PromptEmbeds` (indexing, ``repeat_interleave``, ``cat``).
    """

    prompt_embeds: torch.Tensor
    attention_mask: torch.Tensor


def default_complex_human_instruction() -> list[str]:
    """The instruction lines ``SanaPipeline.__call__`` prepends to prompts by default (read from its signature)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def _check_sana_folder(path: str) -> None:
    """Raise a clear error when a local diffusers folder holds another pipeline class than SANA text-to-image."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls != "SanaPipeline":
        hint = {"StableDiffusion3Pipeline": " Use model.family=sd3.", "FluxPipeline": " Use model.family=flux.",
                "StableDiffusionPipeline": " Use model.family=unet."}.get(cls, "")
        raise ValueError(f"{path!r} holds a {cls or 'unknown'} checkpoint; SanaAdapter needs a SanaPipeline folder "
                         f"(e.g. Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers).{hint}")


def euler_scheduler_for(scheduler):
    """The ``FlowMatchEulerDiscreteScheduler`` with the same flow shift as ``scheduler`` (see the module docstring).

    Accepts a ``FlowMatchEulerDiscreteScheduler`` (returned unchanged) or a ``DPMSolverMultistepScheduler`` /
    ``FlowMatch``-style scheduler configured for flow matching (``use_flow_sigmas=True``,
    ``prediction_type="flow_prediction"``); its ``flow_shift`` becomes the Euler scheduler's static ``shift``.

    Raises:
        ValueError: for a scheduler that is not a flow-matching one (its σ/velocity frame would differ).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    cfg = scheduler.config
    if not (cfg.get("use_flow_sigmas", False) and cfg.get("prediction_type") == "flow_prediction"):
        raise ValueError(f"SanaAdapter needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, or "
                         f"{type(scheduler).__name__} with use_flow_sigmas=True and "
                         f"prediction_type='flow_prediction'); "
                         f"got {type(scheduler).__name__} with {dict(cfg)}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                           shift=float(cfg.get("flow_shift", 1.0)))


class SanaAdapter(PipelineFacts):
    """Velocity, prompt encoding, σ grid and decoding for a ``diffusers.SanaPipeline`` (SANA 0.6B / 1.6B).

    The pipeline's scheduler is replaced in place by the equivalent-shift ``FlowMatchEulerDiscreteScheduler``
    (:func:`euler_scheduler_for`), so ``adapter.pipeline(...)`` is the ODE that a noise level of 0 reproduces.

    Args:
        pipeline: a loaded ``diffusers.SanaPipeline``.
        max_sequence_length: Gemma tokens per prompt kept after the instruction (SANA: 300, the pipeline's default).
        dtype: compute dtype of the transformer and the text encoder (the sampler maths is float32 regardless).
        complex_human_instruction: ``True`` (default) → the pipeline's default instruction, as ``SanaPipeline``
            samples; ``False``/``None``/``[]`` → none; a list of lines → that instruction. Must match what the
            pipeline is called with for the outputs to agree.
        negative_prompt: the unconditional prompt of CFG (the pipeline's default, ``""``).

    Raises:
        ValueError: if the pipeline's scheduler is not a flow-matching one, or the transformer is guidance-distilled
            (SANA-Sprint).
    """

    family = "sana"
    lora_target_modules = LORA_TARGET_MODULES
    denoiser_attr = "transformer"  # the pipeline component that is trained (LoRA or full fine-tuning)

    def __init__(self, pipeline, max_sequence_length: int = 300, dtype: torch.dtype = torch.float32,
                 complex_human_instruction: list[str] | bool | None = True, negative_prompt: str = ""):
        if getattr(pipeline.transformer.config, "guidance_embeds", False):
            raise ValueError("guidance-distilled SANA (SANA-Sprint, guidance_embeds=True) is not supported by "
                             "SanaAdapter; use a SanaPipeline checkpoint")
        pipeline.scheduler = euler_scheduler_for(pipeline.scheduler)
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype
        if complex_human_instruction is True:
            complex_human_instruction = default_complex_human_instruction()
        self.complex_human_instruction = list(complex_human_instruction or [])
        self.negative_prompt = negative_prompt
        self._negative: dict[int, SanaPromptEmbeds] = {}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        max_sequence_length: int = 300, load_t5: bool = True,
                        complex_human_instruction: list[str] | bool | None = True,
                        negative_prompt: str = "", vae_dtype: torch.dtype = torch.float32) -> "SanaAdapter":
        """Load with ``SanaPipeline.from_pretrained`` and freeze it.

        Args:
            path: local diffusers folder or hub id (e.g. ``Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers``).
            load_t5: ignored (SANA has no T5; accepted so that the trainer passes ``model.load_t5`` uniformly).
            vae_dtype: dtype of the DC-AE (float32 by default, as diffusers' SANA example keeps it: DC-AE overflows
                in float16).
            Others: see :class:`SanaAdapter`.

        Raises:
            FileNotFoundError: for a local path without ``model_index.json``, or a hub id missing from the cache when
                ``HF_HUB_OFFLINE=1``.
            ValueError: if the folder holds another pipeline class.
        """
        from diffusers import SanaPipeline

        del load_t5
        try:
            resolved = resolve_model_path(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. For SANA give a SanaPipeline folder or a hub id such as "
                                    "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers.") from e
        _check_sana_folder(resolved)
        pipe = SanaPipeline.from_pretrained(resolved, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        if pipe.vae.dtype != vae_dtype:
            pipe.vae.to(vae_dtype)
        for m in (pipe.vae, pipe.text_encoder, pipe.transformer):
            m.requires_grad_(False)
        return cls(pipe, max_sequence_length=max_sequence_length, dtype=dtype,
                   complex_human_instruction=complex_human_instruction, negative_prompt=negative_prompt)

    # -- model facts (transformer, device, vae_scale_factor — 32 for SANA's DC-AE: PipelineFacts) ----------------

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``[num_steps + 1]`` float32 σ grid of the (Euler) scheduler, as ``SanaPipeline.__call__`` sets it: the
        static shift of ``linspace(1, shift(1/1000), N)``, then 0. ``height``/``width`` are accepted for a uniform
        interface and ignored (SANA's shift does not depend on the resolution)."""
        del height, width
        sched = self.pipeline.scheduler
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.detach().float().cpu().clone()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H/f, W/f)`` of the latents for ``height × width`` pixels (``f`` = :attr:`vae_scale_factor`).

        Raises:
            ValueError: if the size is not a multiple of 32 (what ``SanaPipeline`` requires) and of
                ``vae_scale_factor × patch_size``.
        """
        f = max(32, self.vae_scale_factor * self.transformer.config.patch_size)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this model, got {height}×{width}")
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """``[B, C, h, w]`` float32 initial latents, sample ``i`` drawn from ``generators[i]`` exactly as the
        pipeline's ``prepare_latents`` draws them (it draws in float32)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)

    # -- prompts -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> SanaPromptEmbeds:
        """Encode prompts with the pipeline's ``encode_prompt`` (instruction prepended, no CFG duplication).

        Returns:
            :class:`SanaPromptEmbeds` with ``prompt_embeds`` ``[B, L, D]`` in ``self.dtype`` and ``attention_mask``
            ``[B, L]`` (``L = max_sequence_length``).
        """
        emb, mask, _, _ = self.pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.complex_human_instruction or None)
        return SanaPromptEmbeds(emb.to(self.dtype), mask)

    @torch.no_grad()
    def negative(self, batch: int) -> SanaPromptEmbeds:
        """The negative prompt (``""`` by default) for ``batch`` samples, cached per batch size.

        Encoded as ``encode_prompt`` encodes it under CFG — a batch of ``batch`` copies, without the instruction —
        because the encoder's matrix products round differently for different batch sizes and CFG must match the
        pipeline bit for bit."""
        if batch not in self._negative:
            _, _, emb, mask = self.pipeline.encode_prompt(
                [""] * batch, do_classifier_free_guidance=True, negative_prompt=self.negative_prompt,
                device=self.device, max_sequence_length=self.max_sequence_length, complex_human_instruction=None)
            self._negative[batch] = SanaPromptEmbeds(emb.to(self.dtype), mask)
        return self._negative[batch]

    # -- the model -----------------------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: SanaPromptEmbeds,
                 guidance_scale: float = 4.5) -> torch.Tensor:
        """Velocity prediction ``v(x, σ)`` (``v ≈ ε - x0``) with classifier-free guidance.

        With ``guidance_scale > 1`` one forward runs on ``[uncond; cond]`` (2B; embeddings and attention masks
        concatenated) and returns ``v_u + g·(v_c - v_u)`` in float32, as ``SanaPipeline`` does (its default g is
        4.5); otherwise a single conditional forward.

        Args:
            x: ``[B, C, h, w]`` latents at σ.
            sigma: ``[B]`` noise levels in [0, 1] (the transformer sees ``σ·1000·timestep_scale``).
            cond: :class:`SanaPromptEmbeds` of the B samples (from :meth:`encode`).

        Returns:
            ``[B, C, h, w]`` float32 velocity (differentiable w.r.t. LoRA parameters when grad is enabled).
        """
        sched_cfg, tcfg = self.pipeline.scheduler.config, self.transformer.config
        timestep = sigma.to(self.device, torch.float32) * sched_cfg.num_train_timesteps
        timestep = timestep * tcfg.timestep_scale
        x_in = x.to(self.dtype)
        if guidance_scale > 1.0:
            neg = self.negative(x.shape[0])
            out = self.transformer(
                torch.cat([x_in, x_in]), encoder_hidden_states=torch.cat([neg.prompt_embeds, cond.prompt_embeds]),
                encoder_attention_mask=torch.cat([neg.attention_mask, cond.attention_mask]),
                timestep=torch.cat([timestep, timestep]), return_dict=False)[0].float()
            v_u, v_c = out.chunk(2)
            out = v_u + guidance_scale * (v_c - v_u)
        else:
            out = self.transformer(x_in, encoder_hidden_states=cond.prompt_embeds,
                                   encoder_attention_mask=cond.attention_mask, timestep=timestep,
                                   return_dict=False)[0].float()
        if tcfg.out_channels // 2 == tcfg.in_channels:  # learned-σ checkpoints: keep the velocity half
            out = out.chunk(2, dim=1)[0]
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` latents → ``[B, 3, H, W]`` float32 images in [0, 1] (as the pipeline's postprocess with
        ``use_resolution_binning=False``)."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd: gradients flow back to ``latents`` (the DC-AE's weights are frozen). Used
        by differentiable-reward fine-tuning (DRaFT / ReFL, :mod:`flowrl.draft`)."""
        vae = self.pipeline.vae
        img = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] → ``[B, C, H/f, W/f]`` float32 latents as the transformer sees them
        (``DC-AE(2·x - 1)·scaling_factor``, the inverse of :meth:`decode`'s normalisation). The DC-AE encoder is
        deterministic, so ``generator`` is accepted for a uniform interface and ignored.

        Raises:
            ValueError: not ``[B, 3, H, W]``, values outside [0, 1], or a size :meth:`latent_shape` rejects.
        """
        del generator
        self.check_images(images)
        vae = self.pipeline.vae
        z = vae.encode(images.to(self.device, vae.dtype) * 2 - 1).latent
        return (z.float() * vae.config.scaling_factor).float()

    # -- LoRA ----------------------------------------------------------------------------------------------------
    def save_lora(self, directory: str | os.PathLike) -> None:
        """Save the LoRA to ``directory`` (``pytorch_lora_weights.safetensors``, adapter config as metadata) so that
        ``SanaPipeline.load_lora_weights(directory)`` restores the same scale ``alpha / rank``."""
        from diffusers import SanaPipeline
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer)
        meta = self.transformer.peft_config["default"].to_dict()
        SanaPipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=meta)
