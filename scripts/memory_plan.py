"""GPU memory plan "on paper" for Flow-GRPO post-training of SD3.5-Medium and FLUX.1-dev with flowrl.

``python scripts/memory_plan.py`` prints one table per model and writes ``docs/memory_plan.md``.

What it does, in order:

1. **Parameters, exactly.** The real diffusers/transformers classes (``SD3Transformer2DModel``,
   ``FluxTransformer2DModel``, ``AutoencoderKL``, ``CLIPTextModelWithProjection``/``CLIPTextModel``,
   ``T5EncoderModel``) are instantiated on the meta device (``with torch.device("meta")``) from the published
   configurations written out below, and the LoRA of flowrl's configs (rank 32 on the attention projections, attached
   with flowrl's own :func:`flowrl.models.sd3.attach_lora`) is counted the same way.
2. **Activations, by formula.** :func:`block_saved_bytes` gives the bytes autograd keeps per transformer block and per
   sample, term by term (see the docstrings); :func:`transformer_activation_bytes` sums the blocks and adds gradient
   checkpointing, the recompute of one block and a transient term. The formula is checked against what PyTorch really
   saves on CPU for tiny configurations of the same classes (:func:`sanity_check`): bytes of the distinct storages
   packed by ``torch.autograd.graph.saved_tensors_hooks`` and, with a ``TorchDispatchMode``, the storages still
   alive after the forward (that one also sees gradient checkpointing) and the peak of live tensors over
   forward + backward.
3. **Plan.** Per model × hardware × method (LoRA or full fine-tuning), the per-GPU memory of the rollout, training
   and optimizer phases for each combination of gradient checkpointing and text-encoder offload, the largest
   micro-batch that fits, and the recommended settings. Every assumption is in :data:`ASSUMPTIONS` and printed into
   the markdown.

It also validates the accelerate launch configurations in ``configs/accelerate`` (:func:`check_accelerate_config`):
``python scripts/memory_plan.py --check-accelerate``.

Nothing is downloaded; everything runs on CPU in well under a minute (``OMP_NUM_THREADS=1`` is fine).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1024**3

# ----------------------------------------------------------------------------------------------------------------
# Published configurations (transformer/config.json, vae/config.json, text_encoder*/config.json of the hub folders
# stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev), written out so that nothing is fetched.
# Cross-checks in the installed diffusers 0.42: SD3Transformer2DModel documents dual_attention_layers (0, …, 12) for
# SD3.5; the single-file loader (loaders/single_file_utils.py) recognises SD3.5-Medium by a pos_embed of 147456 =
# 384² positions and the SD3 family's width 1536 by its 9216 = 6·1536 modulation outputs; FluxTransformer2DModel's
# defaults are FLUX.1's sizes (19 + 38 blocks, 24 heads × 128, joint 4096, pooled 768), dev adding guidance_embeds.
# ----------------------------------------------------------------------------------------------------------------
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# SD3.5 and FLUX.1 share the 16-channel VAE architecture (only scaling/shift factors differ).
VAE_16CH = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32,
    sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)
SD35_VAE = dict(VAE_16CH, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(VAE_16CH, scaling_factor=0.3611, shift_factor=0.1159)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
CLIP_L = dict(_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(_CLIP, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)

# flowrl's LoRA (configs/model/*.yaml: lora_rank 32, ModelConfig.lora_targets)
LORA_RANK = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def build_module(kind: str, config: dict, meta: bool = True) -> torch.nn.Module:
    """Instantiate one of ``sd3 | flux | vae | clip_proj | clip | t5`` from ``config``, on the meta device (no
    memory, no weights) unless ``meta`` is False.

    ``torch.device("meta")`` is used as the default device rather than ``accelerate.init_empty_weights()`` (which
    only moves parameters): SD3's fixed 2-D sin-cos ``pos_embed`` table (384² × 1536) is then not computed either,
    which would take half a minute on one CPU thread, and the count equals a real instantiation's —
    ``init_empty_weights`` re-registers parameters and so unties T5's ``encoder.embed_tokens`` from ``shared``
    (131.6 M parameters counted twice with transformers 5), while a real ``T5EncoderModel`` ties them."""
    from contextlib import nullcontext

    ctx = torch.device("meta") if meta else nullcontext()
    with ctx:
        if kind == "sd3":
            from diffusers import SD3Transformer2DModel

            return SD3Transformer2DModel(**config)
        if kind == "flux":
            from diffusers import FluxTransformer2DModel

            return FluxTransformer2DModel(**config)
        if kind == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**config)
        if kind in ("clip_proj", "clip"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if kind == "clip_proj" else CLIPTextModel
            return cls(CLIPTextConfig(**config))
        if kind == "t5":
            from transformers import T5Config, T5EncoderModel

            return T5EncoderModel(T5Config(**config))
    raise ValueError(f"unknown module kind {kind!r}")


def count_params(module: torch.nn.Module) -> int:
    """Distinct parameters (shared ones once)."""
    return sum(p.numel() for p in module.parameters())


def count_persistent_buffers(module: torch.nn.Module) -> int:
    """Elements of buffers saved in the state dict (SD3's fixed ``pos_embed`` table is one: 384² × 1536)."""
    names = set(module.state_dict().keys())
    return sum(b.numel() for n, b in module.named_buffers() if n in names)


def lora_param_count(transformer: torch.nn.Module, rank: int = LORA_RANK, targets=None) -> int:
    """Trainable parameters of flowrl's LoRA on ``transformer`` (attached in place with flowrl's ``attach_lora``;
    works on the meta device)."""
    from flowrl.models.sd3 import attach_lora

    params = attach_lora(transformer, rank, 2.0 * rank, list(targets or LORA_TARGETS))
    return sum(p.numel() for p in params)


def lora_param_count_analytic(transformer: torch.nn.Module, rank: int = LORA_RANK, targets=None) -> int:
    """The same count by hand: ``rank · (in + out)`` for every ``nn.Linear`` whose name ends with a target (peft's
    suffix match). Used to cross-check :func:`lora_param_count`."""
    targets = list(targets or LORA_TARGETS)
    n = 0
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (m.in_features + m.out_features)
    return n


@dataclass
class ModelCounts:
    name: str
    transformer: int  # trainable parameters of the transformer
    transformer_buffers: int  # persistent buffers (SD3: pos_embed table)
    lora: int
    text_encoders: dict[str, int]
    vae: int
    vae_decoder: int


def model_counts(which: str) -> ModelCounts:
    """Exact parameter counts of SD3.5-Medium (``sd35m``) or FLUX.1-dev (``flux``) from the meta-device models."""
    if which == "sd35m":
        tr = build_module("sd3", SD35M_TRANSFORMER)
        tes = {"CLIP-L (CLIPTextModelWithProjection)": count_params(build_module("clip_proj", CLIP_L)),
               "CLIP-G (CLIPTextModelWithProjection)": count_params(build_module("clip_proj", CLIP_G)),
               "T5-XXL encoder (T5EncoderModel)": count_params(build_module("t5", T5_XXL))}
        vae = build_module("vae", SD35_VAE)
        name = "SD3.5-Medium"
    elif which == "flux":
        tr = build_module("flux", FLUX_DEV_TRANSFORMER)
        tes = {"CLIP-L (CLIPTextModel)": count_params(build_module("clip", CLIP_L)),
               "T5-XXL encoder (T5EncoderModel)": count_params(build_module("t5", T5_XXL))}
        vae = build_module("vae", FLUX_VAE)
        name = "FLUX.1-dev"
    else:
        raise ValueError(which)
    n_tr, n_buf = count_params(tr), count_persistent_buffers(tr)
    analytic = lora_param_count_analytic(tr)
    n_lora = lora_param_count(tr)
    if n_lora != analytic:  # pragma: no cover - a peft/diffusers change would show here
        raise RuntimeError(f"LoRA count mismatch: peft {n_lora} vs rank·(in+out) {analytic}")
    return ModelCounts(name, n_tr, n_buf, n_lora, tes, count_params(vae), count_params(vae.decoder))


# ----------------------------------------------------------------------------------------------------------------
# Activation formula
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Arch:
    """What the activation formula needs to know about a transformer."""

    family: str  # sd3 | flux
    dim: int  # D = heads · head_dim
    heads: int  # H
    head_dim: int
    mlp: int  # F (4·D)
    joint_attention_dim: int  # width of the text features fed to context_embedder
    in_features: int  # per-token input width (SD3: C·p² via the conv patch embed; FLUX: packed 4·C)
    double_blocks: int  # SD3: all blocks; FLUX: FluxTransformerBlock count
    single_blocks: int = 0  # FLUX: FluxSingleTransformerBlock count
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5: blocks with the extra image self-attention (attn2)
    qk_norm: bool = True

    @classmethod
    def from_config(cls, family: str, cfg: dict) -> "Arch":
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if family == "sd3":
            return cls("sd3", d, cfg["num_attention_heads"], cfg["attention_head_dim"], 4 * d,
                       cfg["joint_attention_dim"], cfg["in_channels"] * cfg["patch_size"] ** 2, cfg["num_layers"],
                       0, tuple(cfg.get("dual_attention_layers", ())), cfg.get("qk_norm") is not None)
        return cls("flux", d, cfg["num_attention_heads"], cfg["attention_head_dim"], 4 * d, cfg["joint_attention_dim"],
                   cfg["in_channels"], cfg["num_layers"], cfg["num_single_layers"], (), True)


def _ln(s: int, d: int, e: int) -> int:
    """LayerNorm without affine weights: its input (``e·D`` per token) plus mean and rstd (4 bytes each per token:
    fp32 on CUDA; the CPU kernel keeps them in the input dtype, a negligible difference)."""
    return s * (e * d + 8)


def _lora_inputs(s: int, d: int, r: int, a: int, n: int) -> int:
    """``n`` peft LoRA layers reading the same input: peft casts the input to the LoRA weight dtype (``a`` bytes,
    fp32 in flowrl) separately in every layer, and ``lora_A``'s matmul saves that copy (``a·D``); ``lora_B`` saves
    the rank-``r`` projection (``a·r``). The frozen base ``nn.Linear`` saves nothing (autograd keeps a matmul input
    only when the weight needs a gradient)."""
    return n * s * a * (d + r)


def _rms_qk(s: int, d: int, h: int, e: int, full: bool) -> int:
    """diffusers' ``RMSNorm`` on q or k (``qk_norm="rms_norm"``): the fp32 copy that is squared (4·D), the input
    multiplied by ``rsqrt`` (e·D), ``rsqrt`` itself (fp32, one per head: 4·H); with trainable norm weights (full
    fine-tuning) also the normalised tensor multiplied by the weight (e·D)."""
    return s * (4 * d + e * d + 4 * h + (e * d if full else 0))


def _sdpa(s: int, d: int, h: int, e: int) -> int:
    """Fused scaled-dot-product attention (flash / memory-efficient kernels, also PyTorch's CPU flash kernel): q, k,
    v and the output (4·e·D per token of the joint sequence) plus the fp32 log-sum-exp per head (4·H); no S²
    term."""
    return s * (4 * e * d + 4 * h)


def block_saved_bytes(arch: Arch, kind: str, s_x: int, s_c: int, *, full: bool, e: int = 2, a: int = 4,
                      r: int = LORA_RANK, first: bool = False, last: bool = False, dual: bool = False) -> int:
    """Bytes autograd saves for one sample in one transformer block (no gradient checkpointing).

    Args:
        kind: ``joint`` (SD3 ``JointTransformerBlock`` / FLUX ``FluxTransformerBlock``: image and text streams with
            their own weights, one joint attention) or ``single`` (FLUX ``FluxSingleTransformerBlock``: one stream of
            ``s_x + s_c`` tokens, attention and MLP in parallel).
        s_x, s_c: image and text tokens.
        full: full fine-tuning (every weight trainable, the timestep embedding needs gradients, so every matmul
            input and every modulated tensor is saved) or flowrl's LoRA (base frozen, only LoRA inputs and what the
            backward through the frozen graph needs are saved).
        e: bytes of the compute dtype (2: fp16/bf16). a: bytes of the LoRA dtype (4: flowrl keeps LoRA in fp32).
        first: the first block under LoRA, whose inputs come from frozen embedders (no gradient): its first
            LayerNorms save nothing.
        last: SD3's last block (``context_pre_only``): the text stream stops after attention (no output projection,
            no MLP).
        dual: SD3.5's blocks with ``attn2``, a second self-attention over the image tokens.

    Terms per token and stream (D = dim, F = 4D, H = heads), LoRA | full:

    ========================  =============================  ================================================
    LayerNorm 1               e·D + 8 (0 in the first block)  e·D + 8, + e·D (its output, times 1+scale)
    q/k/v projections         3·a·(D + r)                     e·D (modulated input, shared by q, k, v)
    q and k RMSNorm           2·(4·D + e·D + 4·H)             2·(4·D + 2·e·D + 4·H)
    attention (joint seq.)    4·e·D + 4·H                     4·e·D + 4·H
    output projection         a·(D + r)                       e·D (input copy) + e·D (output, times the gate)
    LayerNorm 2               e·D + 8                         e·D + 8, + 2·e·D (output; modulated MLP input)
    MLP (GELU-tanh)           e·F (GELU input)                2·e·F (GELU input, fc2 input) + e·D (× gate)
    ========================  =============================  ================================================

    ``dual`` adds to the image stream: q/k/v projections, q/k RMSNorm, an attention over the image tokens only and an
    output projection (as above; under full fine-tuning + e·D for the second modulated input). The FLUX single block
    per token of the joint sequence: LayerNorm, q/k/v projections (full: one shared modulated input, also read by
    the MLP's fc1), q/k RMSNorm, attention, GELU input (e·F); full fine-tuning adds the concatenation [attention,
    GELU output] read by ``proj_out`` (e·(D+F)) and ``proj_out``'s output times the gate (e·D). Per-sample terms
    (the timestep embedding, modulation vectors: O(D) per sample, not per token) and FLUX's rotary cos/sin (shared
    by all blocks) are left out: they are below 1 % at these sequence lengths.
    """
    d, h, f = arch.dim, arch.heads, arch.mlp

    def qkv(s):
        return e * s * d if full else _lora_inputs(s, d, r, a, 3)

    def out_proj(s):
        return 2 * e * s * d if full else _lora_inputs(s, d, r, a, 1)

    def ln1(s):
        if first and not full:
            return 0
        return _ln(s, d, e) + (e * s * d if full else 0)

    def mlp_part(s):  # LayerNorm 2 + modulation + MLP
        return _ln(s, d, e) + (2 * e * s * d + 2 * e * s * f + e * s * d if full else e * s * f)

    qk = 2 if arch.qk_norm else 0
    if kind == "single":
        s = s_x + s_c
        total = ln1(s) + qkv(s) + qk * _rms_qk(s, d, h, e, full) + _sdpa(s, d, h, e) + e * s * f
        if full:
            total += e * s * (d + f) + e * s * d
        return total
    total = _sdpa(s_x + s_c, d, h, e)
    # image stream
    total += ln1(s_x) + qkv(s_x) + qk * _rms_qk(s_x, d, h, e, full) + out_proj(s_x) + mlp_part(s_x)
    if dual:
        total += (e * s_x * d if full else 0) + qkv(s_x) + qk * _rms_qk(s_x, d, h, e, full) + _sdpa(s_x, d, h, e)
        total += out_proj(s_x)
    # text stream
    total += ln1(s_c) + qkv(s_c) + qk * _rms_qk(s_c, d, h, e, full)
    if not last:
        total += out_proj(s_c) + mlp_part(s_c)
    return total


def outside_blocks_saved_bytes(arch: Arch, s_x: int, s_c: int, *, full: bool, e: int = 2) -> int:
    """Per sample, outside the blocks: the final AdaLayerNorm's LayerNorm input (LoRA); under full fine-tuning also
    the inputs of the trainable embedders (patch/x embedder: in_features per image token; context embedder:
    joint_attention_dim per text token), the final LayerNorm output and ``proj_out``'s input."""
    total = _ln(s_x, arch.dim, e)
    if full:
        total += e * s_x * arch.in_features + e * s_c * arch.joint_attention_dim + 2 * e * s_x * arch.dim
    return total


def blocks(arch: Arch) -> list[dict]:
    """The block list as keyword arguments of :func:`block_saved_bytes`."""
    out = []
    for i in range(arch.double_blocks):
        out.append(dict(kind="joint", first=i == 0, dual=i in arch.dual_attention_layers,
                        last=arch.family == "sd3" and i == arch.double_blocks - 1))
    for i in range(arch.single_blocks):
        out.append(dict(kind="single", first=arch.double_blocks == 0 and i == 0))
    return out


def transient_bytes(arch: Arch, s_x: int, s_c: int, e: int = 2) -> int:
    """Per sample: tensors alive only inside one block's forward or backward on top of what is saved — the incoming
    and outgoing gradients of both streams (2·e·D per token), the gradients of q, k, v (3·e·D), the MLP's hidden
    activation and its gradient (2·e·F). An estimate (kernel scratch differs between CPU and GPU); the CPU
    measurement in :func:`sanity_check` compares it with the observed peak."""
    s = s_x + s_c
    return s * e * (5 * arch.dim + 2 * arch.mlp)


@dataclass
class Activations:
    saved: int  # held for backward at the end of the forward
    peak: int  # saved + the largest transient (+ the recompute of one block with checkpointing)


def transformer_activation_bytes(arch: Arch, batch: int, s_x: int, s_c: int, *, full: bool, checkpointing: bool,
                                 e: int = 2, a: int = 4, r: int = LORA_RANK) -> Activations:
    """Activation memory of one forward + backward of ``batch`` rows (SD3 with CFG: twice the micro-batch).

    Without checkpointing: Σ blocks :func:`block_saved_bytes` + :func:`outside_blocks_saved_bytes`; the peak adds
    :func:`transient_bytes`. With diffusers' gradient checkpointing (non-reentrant ``torch.utils.checkpoint`` per
    block) each block keeps only its inputs, ``e·D·(s_x + s_c)`` per sample; during the backward one block at a time
    is recomputed, so the peak adds the largest single block's saved bytes and the transient.
    """
    per_block = [block_saved_bytes(arch, s_x=s_x, s_c=s_c, full=full, e=e, a=a, r=r, **b) for b in blocks(arch)]
    outside = outside_blocks_saved_bytes(arch, s_x, s_c, full=full, e=e)
    trans = transient_bytes(arch, s_x, s_c, e)
    if checkpointing:
        saved = len(per_block) * e * arch.dim * (s_x + s_c) + outside
        peak = saved + max(per_block) + trans
    else:
        saved = sum(per_block) + outside
        peak = saved + trans
    return Activations(batch * saved, batch * peak)


# ----------------------------------------------------------------------------------------------------------------
# Measurement on CPU (tiny configurations of the same classes)
# ----------------------------------------------------------------------------------------------------------------
class LiveTensorTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the storages produced by every aten op while active (forward and backward): ``live()`` is the bytes
    of those still alive now, ``peak`` the largest value seen after any op. Storages whose data pointer is in
    ``exclude`` (parameters, buffers, inputs: views of them such as ``weight.t()`` come out of ops too) are never
    counted."""

    def __init__(self, exclude: set[int] | None = None):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.exclude = set(exclude or ())
        self.records: dict[int, tuple] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st.data_ptr() in self.exclude:
                    continue
                ref = self._ref(st)
                if ref.cdata not in self.records:
                    self.records[ref.cdata] = (ref, st.nbytes())
        self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        dead = [k for k, (ref, _) in self.records.items() if ref.expired()]
        for k in dead:
            del self.records[k]
        return sum(n for _, n in self.records.values())


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def tiny_sd3_config(**over) -> dict:
    """A 2-block SD3.5-like transformer (first block dual-attention, last block context_pre_only, RMS q/k norm)."""
    cfg = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
               pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    cfg.update(over)
    return cfg


def tiny_flux_config(**over) -> dict:
    cfg = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=2,
               attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
               guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    cfg.update(over)
    return cfg


def _to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` without diffusers' advice to load with ``torch_dtype`` (these are random weights)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return module.to(dtype)
    finally:
        dlogging.set_verbosity(level)


def _tiny_model(family: str, cfg: dict, full: bool, rank: int, dtype: torch.dtype, checkpointing: bool):
    from flowrl.models.sd3 import attach_lora

    torch.manual_seed(0)
    m = _to_dtype(build_module(family, cfg, meta=False), dtype)
    m.requires_grad_(full)
    if not full:
        for p in attach_lora(m, rank, 2.0 * rank, LORA_TARGETS):
            p.data = p.data.float()  # as flowrl's Trainer: LoRA weights in fp32
    if checkpointing:
        m.enable_gradient_checkpointing()
    return m


def _tiny_inputs(family: str, cfg: dict, batch: int, latent: int, text: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "sd3":
        return dict(hidden_states=torch.randn(batch, cfg["in_channels"], latent, latent, generator=g).to(dtype),
                    encoder_hidden_states=torch.randn(batch, text, cfg["joint_attention_dim"], generator=g).to(dtype),
                    pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(dtype),
                    timestep=torch.rand(batch, generator=g) * 1000, return_dict=False)
    n = latent * latent
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(latent).repeat_interleave(latent)
    img_ids[:, 2] = torch.arange(latent).repeat(latent)
    return dict(hidden_states=torch.randn(batch, n, cfg["in_channels"], generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, text, cfg["joint_attention_dim"], generator=g).to(dtype),
                pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(dtype),
                timestep=torch.rand(batch, generator=g).to(dtype), guidance=torch.full((batch,), 3.5),
                txt_ids=torch.zeros(text, 3), img_ids=img_ids, return_dict=False)


@dataclass
class Measurement:
    family: str
    full: bool
    checkpointing: bool
    batch: int
    s_x: int
    s_c: int
    hooks_saved: int | None  # distinct storages packed by saved_tensors_hooks (None with checkpointing)
    retained: int  # op-produced storages alive after the forward (minus the output)
    peak: int  # largest live op-produced bytes over forward + backward
    nograd_peak: int  # largest live bytes of a forward under no_grad (rollout / KL reference)
    formula: Activations = field(default_factory=lambda: Activations(0, 0))
    formula_nograd: int = 0


def measure_tiny(family: str = "sd3", *, full: bool = False, checkpointing: bool = False, batch: int = 2,
                 latent: int = 16, text: int = 20, rank: int = 4, dtype: torch.dtype = torch.bfloat16,
                 config: dict | None = None) -> Measurement:
    """Forward + backward of a tiny transformer on CPU; returns what autograd saved and the formula's estimate.

    ``latent`` is the latent side (SD3: C×latent×latent, patch 2 → (latent/2)² image tokens; FLUX: latent² packed
    tokens). ``hooks_saved`` sums each distinct storage packed by ``saved_tensors_hooks`` once, leaving out
    parameters (weights saved for the input gradient are not activations)."""
    cfg = config or (tiny_sd3_config() if family == "sd3" else tiny_flux_config())
    m = _tiny_model(family, cfg, full, rank, dtype, checkpointing)
    inputs = _tiny_inputs(family, cfg, batch, latent, text, dtype)
    params = {_storage_key(p) for p in m.parameters()} | {_storage_key(b) for b in m.buffers()}
    params |= {_storage_key(v) for v in inputs.values() if isinstance(v, torch.Tensor)}
    packed: dict[int, int] = {}

    def pack(t):
        k = _storage_key(t)
        if k not in params:
            packed[k] = t.untyped_storage().nbytes()
        return t

    hooks = None
    if not checkpointing:
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        hooks.__enter__()
    tracker = LiveTensorTracker(params)
    try:
        with tracker:
            out = m(**inputs)[0]
            gc.collect()
            retained = tracker.live() - out.untyped_storage().nbytes()
            out.float().square().mean().backward()
            del out
    finally:
        if hooks is not None:
            hooks.__exit__(None, None, None)
    nograd = LiveTensorTracker(params)
    with torch.no_grad(), nograd:
        m(**inputs)
    arch = Arch.from_config(family, cfg)
    s_x = (latent // cfg["patch_size"]) ** 2 if family == "sd3" else latent * latent
    e = torch.finfo(dtype).bits // 8
    a = 2 if full else 4
    est = transformer_activation_bytes(arch, batch, s_x, text, full=full, checkpointing=checkpointing, e=e, a=4,
                                       r=rank)
    return Measurement(family, full, checkpointing, batch, s_x, text, sum(packed.values()) if hooks else None,
                       retained, tracker.peak, nograd.peak, est, batch * forward_nograd_bytes(arch, s_x, text, e, a))


def measure_vae_decode(latent: int = 16, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Peak live bytes of ``AutoencoderKL.decode`` (the real 16-channel SD3.5/FLUX architecture, random weights) for
    ``batch`` latents of ``latent``² (image side 8·latent) under ``no_grad``; also per output pixel."""
    torch.manual_seed(0)
    vae = _to_dtype(build_module("vae", VAE_16CH, meta=False), dtype).eval()
    z = torch.randn(batch, 16, latent, latent).to(dtype)
    tracker = LiveTensorTracker({_storage_key(p) for p in vae.parameters()} | {_storage_key(z)})
    with torch.no_grad(), tracker:
        img = vae.decode(z, return_dict=False)[0]
        del img
    pixels = batch * (8 * latent) ** 2
    return dict(latent=latent, batch=batch, peak=tracker.peak, bytes_per_pixel=tracker.peak / pixels)


def sanity_check(quick: bool = False) -> list[Measurement]:
    """Formula vs CPU measurement for tiny SD3 and FLUX transformers: LoRA and full fine-tuning, with and without
    gradient checkpointing (bf16 base, fp32 LoRA as in flowrl)."""
    rows = []
    for family in ("sd3", "flux"):
        for full in (False, True):
            for ckpt in (False, True):
                if quick and (family == "flux" or ckpt):
                    continue
                latent = 16 if family == "sd3" else 8
                rows.append(measure_tiny(family, full=full, checkpointing=ckpt, latent=latent))
    return rows


def forward_nograd_bytes(arch: Arch, s_x: int, s_c: int, e: int = 2, a: int = 4) -> int:
    """Per sample, the live tensors of a forward without gradients (rollout, KL reference): the two streams
    entering a block plus one block's temporaries — q, k, v and attention output, LoRA's fp32 input copy, the MLP
    hidden activation and GELU output (FLUX single blocks also concatenate [attention, MLP] for ``proj_out``):
    ``(s_x + s_c) · (e·(7·D + 2·F) + a·D)``. Checked against the CPU peak in :func:`sanity_check` (formula /
    measured 0.9–1.4 on the tiny configurations: conservative for SD3)."""
    return (s_x + s_c) * (e * (7 * arch.dim + 2 * arch.mlp) + a * arch.dim)


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One model at one resolution as flowrl trains it."""

    key: str
    name: str
    family: str
    config: dict
    resolution: int
    text_tokens: int  # tokens of the text stream (SD3: 77 CLIP + T5 max_sequence_length; FLUX: T5 tokens)
    pooled: int  # pooled text embedding width
    cfg_doubling: bool  # SD3: CFG as one batched forward over [uncond; cond] (also in the update: flowrl's velocity)
    compute_bytes: int = 2  # fp16 (SD3.5-M config) / bf16 (FLUX config)

    @property
    def latent_side(self) -> int:
        return self.resolution // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent_side // 2) ** 2  # 2×2 patches (SD3 conv patch embed, FLUX packing)

    @property
    def latent_elems(self) -> int:
        return 16 * self.latent_side**2

    @property
    def arch(self) -> Arch:
        return Arch.from_config(self.family, self.config)


SD35M_512 = Workload("sd35m", "SD3.5-Medium", "sd3", SD35M_TRANSFORMER, 512, 77 + 256, 2048, True)
FLUX_1024 = Workload("flux", "FLUX.1-dev", "flux", FLUX_DEV_TRANSFORMER, 1024, 512, 768, False)
FLUX_512 = Workload("flux", "FLUX.1-dev", "flux", FLUX_DEV_TRANSFORMER, 512, 512, 768, False)

# Flow-GRPO's recipe as flowrl configures it: configs/trainer/flow_grpo_sd3.yaml (24 images × 48 prompts per epoch,
# micro_batch 8), configs/sampler/sde.yaml (10 sampling steps).
RECIPE = dict(samples_per_epoch=24 * 48, micro_batch=8, train_steps=10)
HARDWARE = [("1×24 GB", 1, 24), ("1×80 GB", 1, 80), ("8×80 GB", 8, 80)]
OPTIONS = [  # (gradient checkpointing, text encoders offloaded), in the order the recommendation tries them
    (False, False), (True, False), (False, True), (True, True)]
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces
HEADROOM = 0.90  # a recommended setting leaves 10 % of the GPU free (the estimates are ±15 %)
NCCL_GIB = 0.5  # extra per GPU with more than one process
FRAGMENTATION = 1.10  # allocator slack on activations and transients
ZERO2_BUCKETS = 2 * 500_000_000 * 2  # DeepSpeed default reduce + allgather buckets (5e8 elements each), bf16
LORA_DTYPE_BYTES = 4  # flowrl's Trainer keeps LoRA weights in fp32 (p.data = p.data.float())
VAE_DECODE_BYTES_PER_PIXEL = 1536  # measured by measure_vae_decode (bf16): three 256-channel full-size maps

ASSUMPTIONS = [
    "Weights of the frozen parts (transformer under LoRA, text encoders, VAE) in the model's 16-bit dtype "
    "(SD3.5-M config: fp16, FLUX config: bf16): 2 bytes/parameter; SD3's persistent `pos_embed` buffer too.",
    "LoRA (flowrl): rank 32 on to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out (every attention, incl. SD3.5's attn2 "
    "and FLUX's single blocks). flowrl keeps LoRA in fp32: weight 4 + gradient 4 + AdamW m, v 8 = 16 bytes/param, "
    "plus the trainer's EMA copy (4 bytes/param, trainer.ema=true).",
    "Full fine-tuning (not implemented in flowrl's image trainer, see configs/accelerate/README.md): bf16 working "
    "weights 2 + fp32 master 4 + fp32 gradient 4 + AdamW moments 8 = 18 bytes/param on one GPU; EMA 4 bytes/param; "
    "the KL reference is a frozen bf16 copy (2 bytes/param). FSDP FULL_SHARD (8 GPUs): master, gradient, moments, EMA "
    "and the reference sharded (/8); bf16 units gathered on the fly: 3 blocks in flight (current, prefetched, "
    "gradient before reduce-scatter) plus the root unit (embedders, final norm) for the whole forward. ZeRO-2: bf16 "
    "weights and the reference replicated, master + moments + fp32 gradient partition sharded (/8), 2 × 5e8-element "
    "bf16 communication buckets (DeepSpeed's defaults).",
    "Optimizer step: torch's foreach AdamW allocates about one fp32 copy of the (local) trainable parameters "
    "(sqrt of the second moment); the activations are freed by then.",
    "Reference/old policy: flowrl stores the rollout log-probabilities (old policy: no model), and the KL reference "
    "under LoRA is the same transformer with the adapter disabled: zero extra weights, one extra no-grad forward per "
    "trained step (its temporaries count in the training phase). Full fine-tuning needs the frozen copy above "
    "(or algorithm.kl_beta=0).",
    "Activations: the per-block formula of block_saved_bytes (bytes per token and stream, docstring table), summed "
    "over blocks; gradient checkpointing (diffusers, per block) keeps only each block's inputs and adds the "
    "recompute of the largest block; plus a transient of one block's gradients and MLP hidden states. Checked on CPU "
    "against saved_tensors_hooks and live-storage tracking of tiny configurations of the same classes (table below).",
    "SD3.5-M at 512²: 64×64×16 latent, 2×2 patches → 1024 image tokens; 77 CLIP + 256 T5 tokens = 333 text tokens "
    "(configs/model/sd3_5_medium.yaml: max_sequence_length 256). CFG doubles every transformer forward (rollout, "
    "update and KL reference: flowrl's velocity() batches [uncond; cond] whenever guidance_scale > 1).",
    "FLUX.1-dev at 1024²: 128×128×16 latent packed 2×2 → 4096 image tokens + 512 T5 tokens; guidance-distilled "
    "(guidance embedding): one forward per step, no CFG doubling. configs/model/flux_dev.yaml trains at 512² "
    "(1024 image tokens): see the second FLUX table.",
    "Epoch buffers on the GPU (flowrl keeps them on the device): per sample the trajectory latents (train_steps+1 = 11 "
    "fp32 latents) and the prompt embeddings (text tokens × 4096 + pooled, 16-bit); the recipe's 1152 samples per "
    "epoch are split over the GPUs (1152 per GPU on one GPU, 144 on eight).",
    "Rollout phase: one no-grad transformer forward (forward_nograd_bytes) or the VAE decode of the micro-batch, "
    f"whichever is larger; VAE decode = {VAE_DECODE_BYTES_PER_PIXEL} bytes per output pixel in 16-bit, measured on "
    "CPU with the real 16-channel decoder (linear in pixels; GPU SDPA assumed memory-efficient in the 512-channel "
    "mid-block attention: if it fell back to the math kernel add 6 bytes × (latent pixels)² per image, "
    "96 MiB at 512², 1.5 GiB at 1024²). The text encoders' own activations (a few prompts per micro-batch) are "
    "negligible and left out.",
    f"Per GPU: {CONTEXT_GIB} GiB CUDA context/workspaces (+{NCCL_GIB} GiB NCCL buffers with several GPUs) and "
    f"×{FRAGMENTATION} allocator slack on activations/transients. A '24 GB' GPU = 24 GiB, '80 GB' = 80 GiB.",
    "Text encoders 'offloaded' = moved to CPU after the epoch's prompts are encoded (or encoded on CPU); the host "
    "then needs their 16-bit weights in RAM. flowrl does not do this today (the pipeline is moved to the GPU whole).",
    "Not counted: the reward model (GenEval detector / VLM judge; a separate process or the reward server), "
    "evaluation (trainer.eval_batch images decoded at once: keep it ≤ micro_batch), images kept on the host.",
]


@dataclass
class Counts:
    """What the plan needs from :func:`model_counts` plus block sizes (for FSDP units)."""

    transformer: int
    buffers: int
    lora: int
    text_encoders: int
    vae: int
    max_block: int
    root: int  # parameters outside the blocks (FSDP root unit)


def plan_counts(which: str) -> tuple[ModelCounts, Counts]:
    mc = model_counts(which)
    tr = build_module("sd3" if which == "sd35m" else "flux", SD35M_TRANSFORMER if which == "sd35m"
                      else FLUX_DEV_TRANSFORMER)
    blocks_ = list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", []))
    sizes = [count_params(b) for b in blocks_]
    return mc, Counts(mc.transformer, mc.transformer_buffers, mc.lora, sum(mc.text_encoders.values()), mc.vae,
                      max(sizes), mc.transformer - sum(sizes))


@dataclass
class Memory:
    """Per-GPU bytes of one scenario at one micro-batch."""

    parts: dict[str, float]
    rollout: float
    train: float
    optimizer: float
    overhead: float

    @property
    def persistent(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return self.persistent + max(self.rollout, self.train, self.optimizer) + self.overhead


def memory(w: Workload, c: Counts, *, gpus: int, full: bool, sharding: str, checkpointing: bool, te_offload: bool,
           micro_batch: int) -> Memory:
    """Per-GPU memory (bytes) of one configuration; ``sharding`` is ``none`` | ``ddp`` | ``fsdp`` | ``zero2``."""
    e, n = w.compute_bytes, gpus
    N = c.transformer
    parts: dict[str, float] = {}
    if not full:
        parts["transformer weights"] = (N + c.buffers) * e
        parts["trainable + AdamW"] = c.lora * (16 + (4 if sharding == "ddp" else 0))  # + all-reduce copy
        parts["EMA"] = c.lora * 4
        parts["reference"] = 0
        step_tmp = c.lora * 4
    elif sharding == "fsdp":
        parts["transformer weights"] = c.buffers * 2 + (3 * c.max_block + c.root) * 2  # gathered bf16 units
        parts["trainable + AdamW"] = N * 16 / n
        parts["EMA"] = N * 4 / n
        parts["reference"] = N * 2 / n
        step_tmp = N * 4 / n
    elif sharding == "zero2":
        parts["transformer weights"] = (N + c.buffers) * 2
        parts["trainable + AdamW"] = N * 16 / n + ZERO2_BUCKETS
        parts["EMA"] = N * 4 / n
        parts["reference"] = N * 2
        step_tmp = N * 4 / n
    else:  # one GPU (or DDP) full fine-tuning
        parts["transformer weights"] = (N + c.buffers) * 2
        parts["trainable + AdamW"] = N * 16
        parts["EMA"] = N * 4
        parts["reference"] = N * 2
        step_tmp = N * 4
    parts["text encoders"] = 0 if te_offload else c.text_encoders * 2
    parts["VAE"] = c.vae * 2
    per_sample = ((RECIPE["train_steps"] + 1) * w.latent_elems * 4 + RECIPE["train_steps"] * 4
                  + (w.text_tokens * 4096 + w.pooled) * e)
    parts["epoch buffers"] = RECIPE["samples_per_epoch"] // n * per_sample
    rows = micro_batch * (2 if w.cfg_doubling else 1)
    arch = w.arch
    a = 2 if full else LORA_DTYPE_BYTES
    s_x, s_c = w.image_tokens, w.text_tokens
    acts = transformer_activation_bytes(arch, rows, s_x, s_c, full=full, checkpointing=checkpointing, e=e, a=a)
    ref_fwd = rows * forward_nograd_bytes(arch, s_x, s_c, e, a)
    sampler = micro_batch * 10 * w.latent_elems * 4  # velocity, means, log-prob terms in fp32
    train = FRAGMENTATION * (max(acts.peak, acts.saved + ref_fwd) + sampler)
    rollout = FRAGMENTATION * max(ref_fwd, micro_batch * VAE_DECODE_BYTES_PER_PIXEL * w.resolution**2)
    overhead = (CONTEXT_GIB + (NCCL_GIB if n > 1 else 0)) * GiB
    return Memory(parts, rollout, train, step_tmp, overhead)


def max_micro_batch(w: Workload, c: Counts, capacity_gib: float, limit: int = 64, **kw) -> int:
    """Largest micro-batch ≤ ``limit`` whose peak fits ``capacity_gib`` (0: not even 1)."""
    best = 0
    for b in range(1, limit + 1):
        if memory(w, c, micro_batch=b, **kw).peak <= capacity_gib * GiB:
            best = b
        else:
            break
    return best


@dataclass
class Row:
    hardware: str
    gpus: int
    capacity: float
    method: str
    sharding: str
    options: dict  # (ckpt, offload) -> max micro-batch
    peaks: dict  # (ckpt, offload) -> peak bytes at that micro-batch (or at 1 when it does not fit)
    recommended: tuple | None  # (ckpt, offload, micro_batch)
    tight: bool  # the recommendation needs more than HEADROOM of the GPU
    breakdown: Memory | None

    @property
    def fits(self) -> bool:
        return self.recommended is not None


def recommend(options: dict, samples_per_rank: int) -> tuple | None:
    """The first option (in :data:`OPTIONS` order: as flowrl runs today, + checkpointing, + text-encoder offload,
    both) whose max micro-batch reaches the recipe's 8; otherwise the option with the largest one. The micro-batch
    is the largest divisor of the per-GPU samples ≤ min(max, 8) (flowrl's config validation needs a divisor).
    ``options`` maps each option to its max micro-batch (the plan passes the ones within :data:`HEADROOM`)."""
    target = RECIPE["micro_batch"]
    chosen = next((o for o in OPTIONS if options[o] >= target), None)
    if chosen is None:
        chosen = max(OPTIONS, key=lambda o: (options[o], -OPTIONS.index(o)))
        if options[chosen] == 0:
            return None
    cap = min(options[chosen], target)
    mb = max(d for d in range(1, cap + 1) if samples_per_rank % d == 0)
    return (*chosen, mb)


def plan(w: Workload, c: Counts) -> list[Row]:
    rows = []
    for hw, gpus, cap in HARDWARE:
        methods = [("LoRA r32", False, "ddp" if gpus > 1 else "none")]
        methods += [("full FT", True, s) for s in (("fsdp", "zero2") if gpus > 1 else ("none",))]
        for name, full, sharding in methods:
            opts, safe, peaks = {}, {}, {}
            kw = dict(gpus=gpus, full=full, sharding=sharding)
            for ckpt, off in OPTIONS:
                b = max_micro_batch(w, c, cap, checkpointing=ckpt, te_offload=off, **kw)
                opts[(ckpt, off)] = b
                safe[(ckpt, off)] = max_micro_batch(w, c, HEADROOM * cap, checkpointing=ckpt, te_offload=off, **kw)
                peaks[(ckpt, off)] = memory(w, c, checkpointing=ckpt, te_offload=off, micro_batch=max(b, 1), **kw).peak
            per_rank = RECIPE["samples_per_epoch"] // gpus
            rec, tight = recommend(safe, per_rank), False
            if rec is None:
                rec, tight = recommend(opts, per_rank), True
            bd = None if rec is None else memory(w, c, checkpointing=rec[0], te_offload=rec[1], micro_batch=rec[2],
                                                 **kw)
            rows.append(Row(hw, gpus, cap, name, sharding, opts, peaks, recommended=rec,
                            tight=tight and rec is not None, breakdown=bd))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------
SHARDING_NAMES = {"none": "—", "ddp": "DDP", "fsdp": "FSDP full shard", "zero2": "ZeRO-2"}


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _option_name(ckpt: bool, off: bool) -> str:
    return f"ckpt {'on' if ckpt else 'off'} · TE {'offloaded' if off else 'on GPU'}"


def plan_table(rows: list[Row]) -> str:
    head = ["GPUs", "method", "sharding", *[_option_name(*o) for o in OPTIONS], "fits?", "recommended"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for o in OPTIONS:
            b = r.options[o]
            cells.append(f"mb ≤ {b} ({_gib(r.peaks[o])} GiB)" if b else f"✗ ({_gib(r.peaks[o])} GiB at mb 1)")
        if r.recommended:
            ckpt, off, mb = r.recommended
            where = SHARDING_NAMES[r.sharding] if r.sharding != "none" else "single GPU"
            rec = (f"micro_batch={mb}, gradient_checkpointing={'true' if ckpt else 'false'}, text encoders "
                   f"{'offloaded' if off else 'on GPU'}, {where}" + (" (tight: < 10 % free)" if r.tight else ""))
        else:
            rec = "does not fit"
        lines.append("| " + " | ".join([r.hardware, r.method, SHARDING_NAMES[r.sharding], *cells,
                                         "yes" if r.fits else "**no**", rec]) + " |")
    return "\n".join(lines)


def breakdown_table(rows: list[Row]) -> str:
    keys = ["transformer weights", "trainable + AdamW", "EMA", "reference", "text encoders", "VAE", "epoch buffers"]
    head = ["GPUs", "method", "setting", *keys, "rollout", "training", "optimizer step", "peak / capacity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.breakdown is None:
            continue
        m, (ckpt, off, mb) = r.breakdown, r.recommended
        setting = f"mb {mb}, ckpt {'on' if ckpt else 'off'}, TE {'off' if off else 'GPU'}"
        lines.append("| " + " | ".join([r.hardware, f"{r.method} ({SHARDING_NAMES[r.sharding]})", setting,
                                         *[_gib(m.parts[k]) for k in keys], _gib(m.rollout), _gib(m.train),
                                         _gib(m.optimizer), f"{_gib(m.peak)} / {r.capacity}"]) + " |")
    return "\n".join(lines)


def activation_summary(w: Workload) -> str:
    """Per-sample activation numbers of one workload (bytes → MiB)."""
    arch, e = w.arch, w.compute_bytes
    rows_per_sample = 2 if w.cfg_doubling else 1
    out = ["| mode | saved, no ckpt | peak, no ckpt | saved, ckpt | peak, ckpt |", "|---|---|---|---|---|"]
    for full in (False, True):
        a = 2 if full else LORA_DTYPE_BYTES
        vals = []
        for ckpt in (False, True):
            act = transformer_activation_bytes(arch, rows_per_sample, w.image_tokens, w.text_tokens, full=full,
                                               checkpointing=ckpt, e=e, a=a)
            vals += [f"{act.saved / 2**20:,.0f}", f"{act.peak / 2**20:,.0f}"]
        out.append(f"| {'full FT' if full else 'LoRA r32'} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def per_token_table(w: Workload) -> str:
    """Bytes per token of each block type (one sample), LoRA and full."""
    arch, e = w.arch, w.compute_bytes
    s_x, s_c = w.image_tokens, w.text_tokens
    lines = ["| block | count | LoRA bytes/sample | full FT bytes/sample |", "|---|---|---|---|"]
    seen: dict[str, list] = {}
    for b in blocks(arch):
        label = (b["kind"] + (" (dual attention)" if b.get("dual") else "") + (" (first)" if b.get("first") else "")
                 + (" (last, context_pre_only)" if b.get("last") else ""))
        if label not in seen:
            lo = block_saved_bytes(arch, s_x=s_x, s_c=s_c, full=False, e=e, a=LORA_DTYPE_BYTES, **b)
            fu = block_saved_bytes(arch, s_x=s_x, s_c=s_c, full=True, e=e, a=2, **b)
            seen[label] = [0, lo, fu]
        seen[label][0] += 1
    for label, (cnt, lo, fu) in seen.items():
        lines.append(f"| {label} | {cnt} | {lo / 2**20:,.1f} MiB | {fu / 2**20:,.1f} MiB |")
    return "\n".join(lines)


def sanity_table(ms: list[Measurement]) -> str:
    lines = ["| model | mode | ckpt | tokens (img+txt) × batch | saved (hooks) | retained after fwd | formula saved | "
             "ratio | measured peak | formula peak | ratio | no-grad fwd peak | formula | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ms:
        ref = m.hooks_saved if m.hooks_saved is not None else m.retained
        lines.append(f"| tiny {m.family.upper()} | {'full' if m.full else 'LoRA'} | "
                     f"{'on' if m.checkpointing else 'off'} | ({m.s_x}+{m.s_c}) × {m.batch} | "
                     f"{m.hooks_saved if m.hooks_saved is not None else '—'} | "
                     f"{m.retained} | {m.formula.saved} | {m.formula.saved / ref:.2f} | {m.peak} | {m.formula.peak} | "
                     f"{m.formula.peak / m.peak:.2f} | {m.nograd_peak} | {m.formula_nograd} | "
                     f"{m.formula_nograd / m.nograd_peak:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# accelerate launch configurations
# ----------------------------------------------------------------------------------------------------------------
ACCELERATE_DIR = ROOT / "configs" / "accelerate"


def check_accelerate_config(path: str | Path, model: torch.nn.Module | None = None) -> dict:
    """Validate one ``accelerate launch --config_file`` YAML with accelerate's own code, without launching.

    1. ``load_config_from_file`` → a ``ClusterConfig`` (refuses unknown top-level keys, converts
       ``distributed_type`` to the enum).
    2. Every key of ``fsdp_config`` / ``deepspeed_config`` / ``dynamo_config`` must be an ``accelerate launch``
       option (``launch`` itself copies unknown nested keys silently).
    3. ``_validate_launch_command`` (what ``accelerate launch`` runs first) merges the file into the launch arguments,
       then the launcher's environment is prepared as ``launch_command`` would (``prepare_deepspeed_cmd_env`` or
       ``prepare_multi_gpu_env``; no process is started).
    4. FSDP: ``FullyShardedDataParallelPlugin`` is built from that environment (sharding strategy, state-dict type,
       wrap policy, prefetch names are parsed), and its ``set_auto_wrap_policy`` resolves the class names on
       ``model`` (a meta-device transformer; by default SD3.5-M's or FLUX.1-dev's by the names in the file). On a
       host without GPUs ``sync_module_states`` is parsed but switched off for the check (the plugin asks for the
       current CUDA device when it is on). DeepSpeed: ``DeepSpeedPlugin`` builds its DeepSpeed config from the
       environment and ``set_mixed_precision`` adds the bf16 section (neither needs the deepspeed package).

    Returns:
        A summary: distributed type, processes, machines, mixed precision, the validated nested options and the
        launcher environment variables that carry them.
    """
    import argparse
    from unittest import mock

    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = str(path)
    cfg = load_config_from_file(path)
    if not isinstance(cfg, ClusterConfig):
        raise ValueError(f"{path}: not a local-cluster configuration ({type(cfg).__name__})")
    parser = launch_command_parser()
    known = set(vars(parser.parse_args(["train.py"])))
    prefixes = {"fsdp_config": "fsdp_", "deepspeed_config": "", "dynamo_config": "dynamo_", "fp8_config": "fp8_"}
    nested = {}
    for section, prefix in prefixes.items():
        for key, value in (getattr(cfg, section) or {}).items():
            arg = key if key.startswith(prefix) else prefix + key
            if arg not in known:
                raise ValueError(f"{path}: {section}.{key} is not an `accelerate launch` option ({arg})")
            nested[f"{section}.{key}"] = value
    args = parser.parse_args(["--config_file", path, "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    summary = dict(file=Path(path).name, distributed_type=cfg.distributed_type.value, num_processes=args.num_processes,
                   num_machines=args.num_machines, machine_rank=args.machine_rank, mixed_precision=args.mixed_precision,
                   use_cpu=cfg.use_cpu, nested=nested)
    dt = cfg.distributed_type
    if dt == DistributedType.DEEPSPEED:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        _cmd, env = prepare_deepspeed_cmd_env(args)
    elif dt in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        ns = argparse.Namespace(**vars(args))
        # the file is checked, not this machine: a busy local port must not fail the check
        with mock.patch("accelerate.utils.launch.is_port_in_use", lambda port: False):
            env = prepare_multi_gpu_env(ns)
        summary["torchrun"] = {k: getattr(ns, k) for k in ("nproc_per_node", "nnodes", "node_rank", "master_addr",
                                                           "master_port", "rdzv_endpoint") if hasattr(ns, k)}
    else:
        env = dict(os.environ)
    summary["env"] = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_")) and os.environ.get(k) != v}
    if dt == DistributedType.FSDP:
        from accelerate.utils import FullyShardedDataParallelPlugin

        check_env = dict(env)
        if not torch.cuda.is_available():
            check_env["FSDP_SYNC_MODULE_STATES"] = "false"
        with mock.patch.dict(os.environ, check_env):
            plugin = FullyShardedDataParallelPlugin()
        if model is None:
            names = plugin.transformer_cls_names_to_wrap or []
            model = (build_module("flux", tiny_flux_config()) if any(n.startswith("Flux") for n in names)
                     else build_module("sd3", tiny_sd3_config()))
        plugin.set_auto_wrap_policy(model)
        summary["fsdp_plugin"] = dict(
            sharding_strategy=str(plugin.sharding_strategy), state_dict_type=str(plugin.state_dict_type),
            use_orig_params=plugin.use_orig_params, cpu_offload=bool(plugin.cpu_offload.offload_params),
            wrap_classes=list(plugin.transformer_cls_names_to_wrap or []),
            backward_prefetch=str(plugin.backward_prefetch), wrapped_on=type(model).__name__)
    if dt == DistributedType.DEEPSPEED:
        from accelerate.utils import DeepSpeedPlugin

        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision(args.mixed_precision)
        ds = plugin.deepspeed_config
        summary["deepspeed_config"] = dict(zero_stage=ds["zero_optimization"]["stage"],
                                           gradient_clipping=ds.get("gradient_clipping"),
                                           gradient_accumulation_steps=ds.get("gradient_accumulation_steps"),
                                           bf16=ds.get("bf16", {}).get("enabled"),
                                           offload_optimizer=ds["zero_optimization"]["offload_optimizer"]["device"],
                                           offload_param=ds["zero_optimization"]["offload_param"]["device"])
    return summary


def check_all_accelerate_configs(directory: Path = ACCELERATE_DIR) -> list[dict]:
    return [check_accelerate_config(p) for p in sorted(directory.glob("*.yaml"))]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def report(quick_check: bool = False) -> str:
    """Everything above as markdown."""
    counts = {k: plan_counts(k) for k in ("sd35m", "flux")}
    ms = sanity_check(quick=quick_check)
    vae = [measure_vae_decode(8), measure_vae_decode(16)]
    out = ["# Memory plan: SD3.5-Medium and FLUX.1-dev under flowrl (LoRA and full fine-tuning)", "",
           "Generated by `python scripts/memory_plan.py` (CPU only, nothing downloaded); edit the script, not this "
           "file. A plan on paper: parameter counts are exact, activation memory comes from a per-block formula "
           "checked against PyTorch on tiny configurations of the same classes, everything else is stated below. "
           "Numbers are per GPU in GiB.", "",
           "## Parameter counts", "",
           "Real diffusers / transformers classes instantiated on the meta device from the published configurations "
           "(written out in the script); LoRA attached with flowrl's `attach_lora` (rank 32, flowrl's target list) "
           "and cross-checked against Σ rank·(in+out) over the matched `nn.Linear`s.", "",
           "| model | part | parameters |", "|---|---|---|"]
    for key, (mc, _c) in counts.items():
        out.append(f"| {mc.name} | transformer (trainable under full FT) | {mc.transformer:,} |")
        if mc.transformer_buffers:
            out.append(f"| {mc.name} | transformer persistent buffer (pos_embed 384²×1536) | "
                       f"{mc.transformer_buffers:,} |")
        out.append(f"| {mc.name} | LoRA r32 on the attention projections | {mc.lora:,} |")
        for te, n in mc.text_encoders.items():
            out.append(f"| {mc.name} | {te} | {n:,} |")
        out.append(f"| {mc.name} | VAE (AutoencoderKL, 16 latent channels; decoder {mc.vae_decoder:,}) | {mc.vae:,} |")
    out += ["", "## Assumptions", ""] + [f"- {a}" for a in ASSUMPTIONS]
    out += ["", "## Activation formula", "",
            "Bytes autograd keeps per token and stream in one block (`block_saved_bytes`; D = width, F = 4D MLP, "
            "H = heads, r = LoRA rank, e = 2 bytes of the fp16/bf16 compute dtype, a = 4 bytes of flowrl's fp32 "
            "LoRA; per-token sums, attention over the joint sequence):", "",
            "| part | LoRA (base frozen) | full fine-tuning |", "|---|---|---|",
            "| LayerNorm 1 | e·D + 8 (nothing in the first block: its inputs need no gradient) | "
            "e·D + 8 + e·D (output × (1+scale)) |",
            "| q/k/v projections | 3·a·(D + r) (peft casts the input to fp32 in each LoRA layer; frozen matmuls "
            "save nothing) | e·D (shared modulated input) |",
            "| q and k RMSNorm | 2·(4·D + e·D + 4·H) | 2·(4·D + 2·e·D + 4·H) |",
            "| fused attention | 4·e·D + 4·H (q, k, v, out, log-sum-exp; no S² term) | same |",
            "| output projection | a·(D + r) | 2·e·D (input copy, output × gate) |",
            "| LayerNorm 2 + MLP | e·D + 8 + e·F (GELU input) | e·D + 8 + 2·e·D + 2·e·F + e·D |", "",
            "SD3.5's dual-attention blocks add a second image self-attention (q/k/v, norms, attention over image "
            "tokens, output); its last block has no text output projection/MLP; FLUX's single blocks run one stream "
            "of image+text tokens with q/k/v, norms, attention and the MLP in parallel (full FT adds the "
            "[attention, MLP] concatenation and the gated output). Gradient checkpointing keeps e·D per token "
            "per block (the block inputs) and recomputes one block at a time; the transient (one block's gradients "
            "and MLP hidden state) is e·(5·D + 2·F) per token.", ""]
    for w in (SD35M_512, FLUX_1024):
        out += [f"Per block type, {w.name} at {w.resolution}² ({w.image_tokens} image + {w.text_tokens} text tokens), "
                "one sample (one forward row):", "", per_token_table(w), "",
                "Whole transformer, per micro-batch sample "
                f"({'2 forward rows: CFG' if w.cfg_doubling else '1 forward row'}), MiB:",
                "", activation_summary(w), ""]
    out += ["### Sanity check on CPU", "",
            "Tiny configurations of the same classes (SD3: 2 blocks, the first with dual attention, the last "
            "context_pre_only, RMS q/k norm; FLUX: 1 double + 2 single blocks), bf16 base, fp32 LoRA r4 as flowrl, "
            "forward + backward on CPU. *saved (hooks)*: distinct storages packed by `saved_tensors_hooks` "
            "(parameters left out); *retained after fwd*: storages produced inside the forward still alive after it "
            "(TorchDispatchMode + storage weak references, also valid with checkpointing); *measured peak*: largest "
            "live total over forward + backward; *no-grad fwd peak*: the same for a forward without gradients "
            "(rollout, KL reference) against `forward_nograd_bytes`. Ratios are formula / measured (the saved "
            "ratio against the hooks, or against the retained bytes with checkpointing, where the hooks do not see "
            "inside the checkpointed blocks). Bytes.", "", sanity_table(ms), "",
            "VAE decode (real 16-channel decoder, random weights, bf16, no_grad): "
            + ", ".join(f"{8 * v['latent']}² px → {v['peak'] / 2**20:.0f} MiB = {v['bytes_per_pixel']:.0f} B/pixel"
                        for v in vae)
            + f"; the plan uses {VAE_DECODE_BYTES_PER_PIXEL} B/pixel "
              f"(512²: {VAE_DECODE_BYTES_PER_PIXEL * 512**2 / 2**20:.0f} MiB, "
              f"1024²: {VAE_DECODE_BYTES_PER_PIXEL * 1024**2 / 2**30:.1f} GiB per image).", ""]
    out += ["## Plans", "",
            "Cells: the largest micro-batch (`trainer.micro_batch`, images per GPU; SD3.5 forwards twice as many "
            "rows for CFG) that fits the whole GPU, with the per-GPU peak at that micro-batch; ✗ = not even 1 (peak "
            "at 1 shown). *ckpt* = `model.gradient_checkpointing`, *TE* = the text encoders. Recommended = the first "
            "column, in the order shown, that reaches the recipe's micro_batch 8 while leaving 10 % of the GPU free "
            "(else the one with the largest such micro-batch; *tight* if only the whole GPU fits), micro_batch capped "
            "at 8 and a divisor of the per-GPU samples (1152 on one GPU, 144 on eight).", ""]
    all_rows = {}
    for w in (SD35M_512, FLUX_1024, FLUX_512):
        rows = all_rows[(w.key, w.resolution)] = plan(w, counts[w.key][1])
        out += [f"### {w.name} at {w.resolution}²", "", plan_table(rows), "",
                "Breakdown of the recommended settings (GiB per GPU; rollout / training / optimizer step are the "
                "phase-specific parts on top of the persistent columns, the peak adds the largest of them and the "
                "CUDA/NCCL overhead):", "", breakdown_table(rows), ""]
    sd_c, fx_c = counts["sd35m"][1], counts["flux"][1]
    no_ref = memory(FLUX_1024, fx_c, gpus=8, full=True, sharding="zero2", checkpointing=True, te_offload=True,
                    micro_batch=1)
    no_ref_peak = no_ref.peak - no_ref.parts["reference"]
    sd_rows = {(r.hardware, r.method): r for r in all_rows[("sd35m", 512)]}
    lora24 = sd_rows[("1×24 GB", "LoRA r32")]
    ratio = {}
    for w in (SD35M_512, FLUX_1024):
        act = [transformer_activation_bytes(w.arch, 1, w.image_tokens, w.text_tokens, full=False, checkpointing=ck)
               for ck in (False, True)]
        ratio[w.key] = act[0].saved / act[1].saved
    o = {opt: lora24.options[opt] for opt in OPTIONS}
    out += ["## Reading the plan", "",
            f"- LoRA: DDP (data parallel) is all that is needed: the base weights are frozen and the trainable state "
            f"(LoRA + AdamW + EMA) is {sd_c.lora * 20 / GiB:.2f} GiB (SD3.5-M) / {fx_c.lora * 20 / GiB:.2f} GiB "
            f"(FLUX). What binds is the frozen text encoders (SD3.5: CLIP-L + CLIP-G + T5-XXL = "
            f"{sd_c.text_encoders * 2 / GiB:.1f} GiB; FLUX: CLIP-L + T5-XXL = {fx_c.text_encoders * 2 / GiB:.1f} GiB), "
            "the epoch buffers when one GPU holds the whole epoch, and the activations: gradient checkpointing "
            f"cuts the saved activations {ratio['sd35m']:.0f}× (SD3.5-M) / {ratio['flux']:.0f}× (FLUX) at the price "
            "of one more forward per block in the update.",
            f"- SD3.5-M LoRA on one 24 GB GPU: as flowrl runs it today (text encoders on the GPU) micro_batch ≤ "
            f"{o[(True, False)]} with checkpointing and {o[(False, False)]} without; with the text encoders off "
            f"the GPU after encoding (not wired today) ≤ {o[(True, True)]} with checkpointing, ≤ {o[(False, True)]} "
            "without. Fewer samples per epoch (trainer.groups_per_epoch) shrink the epoch buffers "
            f"({sd_rows[('1×24 GB', 'LoRA r32')].breakdown.parts['epoch buffers'] / GiB:.1f} GiB for 1152 samples). "
            "FLUX.1-dev does not fit a 24 GB GPU in any mode: its bf16 transformer alone is "
            f"{fx_c.transformer * 2 / GiB:.1f} GiB.",
            f"- Full fine-tuning needs 16–18 bytes per trainable parameter before activations: SD3.5-M "
            f"({sd_c.transformer / 1e9:.2f} B) {sd_c.transformer * 18 / GiB:.0f} GiB on one GPU plus EMA "
            f"({sd_c.transformer * 4 / GiB:.0f} GiB) and the reference copy ({sd_c.transformer * 2 / GiB:.0f} GiB): "
            "one "
            f"80 GB GPU with checkpointing; FLUX.1-dev ({fx_c.transformer / 1e9:.2f} B) "
            f"{fx_c.transformer * 18 / GiB:.0f} GiB: only sharded. FSDP full shard on 8×80 GB fits it with "
            "checkpointing. ZeRO-2 replicates the bf16 weights and the frozen reference on every GPU and does not "
            f"fit FLUX; without the reference (algorithm.kl_beta=0) ZeRO-2 would peak at {no_ref_peak / GiB:.1f} GiB "
            "at micro_batch 1 (checkpointing, text encoders offloaded).",
            "- The rollout's VAE decode of a whole micro-batch at 1024² costs 1.5 GiB per image; "
            "`pipeline.vae.enable_slicing()` (one image at a time) would remove that term — not wired either.",
            "- Wired in flowrl (configs/accelerate/README.md): LoRA with DDP-equivalent data parallelism (the "
            "trainer all-reduces the LoRA gradients itself), full fine-tuning (`model.lora_rank=0`) and FSDP full "
            "shard for it (`trainer.fsdp=true` or the `fsdp_8gpu*.yaml` files). Not wired: DeepSpeed ZeRO-2 "
            "(the file launches but trains unsharded), text-encoder offload, VAE slicing; the rows that assume "
            "them are plans.", ""]
    out += ["## Reproduce", "", "```",
            "OMP_NUM_THREADS=1 python scripts/memory_plan.py                      # tables + this file",
            "OMP_NUM_THREADS=1 python scripts/memory_plan.py --check-accelerate   # validate configs/accelerate/*.yaml",
            "```", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory_plan.md"), help="markdown file to write")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--check-accelerate", action="store_true",
                    help="validate configs/accelerate/*.yaml with accelerate's loader and exit")
    args = ap.parse_args(argv)
    if args.check_accelerate:
        for s in check_all_accelerate_configs():
            print(s["file"], {k: v for k, v in s.items() if k not in ("file", "env")})
        return 0
    md = report()
    print(md)
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
