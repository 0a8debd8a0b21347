"""Builders of the tiny Stable Diffusion 3 pipeline used as the embedded default model and in tests.

Real diffusers/transformers classes at toy sizes: ``SD3Transformer2DModel`` (MMDiT, 4 joint blocks, 128 wide,
2×2 patches of 16×16×4 latents = 64 image tokens), ``AutoencoderKL`` (64×64×3 ↔ 16×16×4), two
``CLIPTextModelWithProjection`` encoders (16 and 32 wide, CLIP's real 49,408-token BPE vocabulary and tokenizer),
the T5 slot (:func:`t5_stub`) and ``FlowMatchEulerDiscreteScheduler`` (shift 3). ``scripts/pretrain_base.py`` trains it;
tests build it with random weights (``tiny_random_pipeline``).
"""

from __future__ import annotations

from pathlib import Path

import torch

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0,
)
TOKEN_LENGTH = 16  # CLIP tokenizer model_max_length of the tiny model (domain prompts need ≤ 12 tokens).


_CLIP_COMMON = dict(vocab_size=49408, num_hidden_layers=3, max_position_embeddings=TOKEN_LENGTH,
                    hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# CLIP-L-like (narrow) and CLIP-G-like (wide) encoders; SD3 concatenates their features (16 + 32 = 48).
TEXT_ENCODER_CONFIG = dict(_CLIP_COMMON, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
TEXT_ENCODER_2_CONFIG = dict(_CLIP_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=128, pooled_projection_dim=48,
    pos_embed_max_size=16, qk_norm="rms_norm",
)
# Number of all-zero "T5" tokens appended by the pipeline when text_encoder_3 is None (its `max_sequence_length`).
# Training mixes lengths so that the model works with flowrl's default (0) and with the pipeline's default (256).
T5_LENGTHS, T5_PROBS = (0, 16, 256), (0.7, 0.2, 0.1)


def _save_unigram_t5_tokenizer(vocab: list[tuple[str, float]], tokenizer_dir: Path, model_max_length: int,
                               lowercase: bool = False) -> None:
    """Write a ``T5TokenizerFast`` over a Unigram model with ``vocab`` (``<pad>``, ``</s>``, ``<unk>`` first),
    Metaspace pre-tokenisation and ``</s>`` appended, into ``tokenizer_dir``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_tok = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    t5_tok.model_max_length = model_max_length
    t5_tok.save_pretrained(tokenizer_dir)


def t5_stub(tokenizer_dir: Path):
    """SD3's third text-encoder slot for the embedded model: a tiny ``T5EncoderModel`` whose final RMSNorm weight is 0,
    so it outputs exact zeros — the same embedding SD3's pipeline uses when T5 is absent — plus a small T5 tokenizer
    over the domain's words. It exists so that ``StableDiffusion3Pipeline.from_pretrained(path)`` loads the folder
    with no extra arguments; flowrl's adapter skips it (``load_t5: false``) and uses the pipeline's zeros directly."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from flowrl.shapes.prompts import all_metadata

    words = sorted({w for m in all_metadata() for w in m["prompt"].split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + [("▁", -3.0)]
    _save_unigram_t5_tokenizer(vocab, tokenizer_dir, model_max_length=512, lowercase=True)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TRANSFORMER_CONFIG["joint_attention_dim"], d_kv=16,
                                 d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1))
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()
    return t5, T5TokenizerFast.from_pretrained(tokenizer_dir)


CHAR_T5_LENGTH = 56  # character tokens of the character-level T5 (domain prompts: ≤ 50 characters + </s>)
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\"'.,-"


def char_t5(tokenizer_dir: Path, seed: int = 0, num_layers: int = 2):
    """A trainable character-level encoder for SD3's T5 slot (what character-aware text rendering uses: T5/ByT5 in
    SD3 and Glyph-ByT5, Liu et al. 2022 "Character-Aware Models Improve Visual Text Rendering").

    The tokenizer (a ``T5TokenizerFast`` over a Unigram model holding only single characters, case-sensitive, ``▁``
    for spaces) splits every word into letters, so the MMDiT sees the letters of the quoted word — the CLIP BPE gives
    it one token per word. ``T5EncoderModel``: ``d_model`` = the transformer's ``joint_attention_dim`` (48),
    ``num_layers`` layers, 4 heads, relative position buckets (letter order). Returns ``(model, tokenizer)``.
    """
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in CHARS]
    _save_unigram_t5_tokenizer(vocab, tokenizer_dir, model_max_length=CHAR_T5_LENGTH)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TRANSFORMER_CONFIG["joint_attention_dim"], d_kv=12,
                                 d_ff=96, num_layers=num_layers, num_heads=4, pad_token_id=0, eos_token_id=1,
                                 relative_attention_num_buckets=16, relative_attention_max_distance=32))
    return t5, T5TokenizerFast.from_pretrained(tokenizer_dir)


def build_pipeline(vae_dir: Path | None, tokenizer_dir: Path, seed: int):
    """Fresh (random) transformer + two CLIP text encoders around the VAE in ``vae_dir`` (random if None), as a
    ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3=None``: the pipeline feeds zeros)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from flowrl.models.clip_tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(tokenizer_dir, model_max_length=TOKEN_LENGTH)
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG))
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderKL.from_pretrained(vae_dir) if vae_dir is not None else AutoencoderKL(**VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
                                    tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None)




def tiny_random_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny SD3 pipeline (with the T5 stub) to ``path``; it loads with
    ``StableDiffusion3Pipeline.from_pretrained(path)``. Used by the tests."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    pipe = build_pipeline(None, path.parent / (path.name + "_tokenizer"), seed)
    t5, t5_tok = t5_stub(path.parent / (path.name + "_tokenizer_3"))
    StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": t5, "tokenizer_3": t5_tok}).save_pretrained(path)
    return path
