"""A tiny random Stable Diffusion 1.5-style pipeline (UNet ε-prediction family), for tests of the UNet adapter.

Real diffusers/transformers classes at toy sizes: ``UNet2DConditionModel`` (two blocks — cross-attention down /
up block at 32 channels and a plain block at 64, cross-attention dim 32), ``AutoencoderKL`` (64×64×3 ↔ 16×16×4,
SD's ``scaling_factor`` 0.18215, quant convs as in SD), ``CLIPTextModel`` (32 wide, 2 layers; CLIP's real 49,408-token
BPE tokenizer from :mod:`flowrl.models.clip_tokenizer`, 16 tokens) and SD1.5's scheduler settings on a
``DDIMScheduler`` (``scaled_linear`` β from 0.00085 to 0.012, 1000 steps, ``set_alpha_to_one=False``,
``steps_offset=1``, ``clip_sample=False``). Saved with ``save_pretrained``; loads with
``StableDiffusionPipeline.from_pretrained(path)`` (no safety checker).
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKEN_LENGTH = 16

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
    scaling_factor=0.18215,
)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=TOKEN_LENGTH, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def build_unet_pipeline(tokenizer_dir: Path, seed: int = 0, prediction_type: str = "epsilon"):
    """A fresh random ``StableDiffusionPipeline`` (no safety checker) with the configs above; the CLIP tokenizer files
    are written to ``tokenizer_dir``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from flowrl.models.clip_tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(tokenizer_dir, model_max_length=TOKEN_LENGTH)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_random_unet_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a randomly initialised tiny SD1.5-style pipeline to ``path``; returns ``path``."""
    path = Path(path)
    pipe = build_unet_pipeline(path.parent / (path.name + "_tokenizer"), seed, prediction_type)
    pipe.save_pretrained(path)
    return path
