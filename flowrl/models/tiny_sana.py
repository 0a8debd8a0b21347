"""Builders of a tiny random SANA pipeline for tests (real diffusers/transformers classes at toy sizes, no downloads).

Components of the saved ``SanaPipeline`` (well under 1 M parameters):

- ``transformer``: ``SanaTransformer2DModel`` with one block (linear self-attention, cross-attention to the text, a
  GLUMBConv feed-forward), 2 heads × 8, 4 latent channels, ``patch_size=1``, ``caption_channels`` = the tiny Gemma's
  hidden size and ``sample_size=32`` (one of the sizes ``SanaPipeline``'s resolution binning accepts; pass
  ``use_resolution_binning=False`` to the pipeline at toy sizes).
- ``vae``: ``AutoencoderDC`` with three stages (8 channels each, ×4 down-sampling, EfficientViT attention in the
  last stage) and 4 latent channels: a 64×64 image ↔ 16×16×4 latents. ``scaling_factor=0.41407`` as SANA's DC-AE.
- ``text_encoder`` / ``tokenizer``: a 32-wide one-layer ``Gemma2Model`` and a small byte-level-fallback BPE
  ``GemmaTokenizer`` trained offline (:func:`write_tiny_gemma_tokenizer`) on the shapes-domain prompts plus SANA's
  complex human instruction — Gemma's real tokenizer is gated on the hub and not available offline. Its special
  tokens follow Gemma's ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) and it prepends ``<bos>`` as Gemma's
  does; any text tokenizes (256 ``<0xNN>`` byte tokens as fallback).
- ``scheduler``: ``DPMSolverMultistepScheduler`` configured as the published SANA checkpoints
  (``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, ``flow_shift=3.0``); :class:`SanaAdapter`
  replaces it by the equivalent-shift ``FlowMatchEulerDiscreteScheduler`` (see :mod:`flowrl.models.sana`).

Sizes follow the habit of diffusers' own pipeline tests (one layer, a handful of channels); the values are this
module's.
"""

from __future__ import annotations

from pathlib import Path

import torch

GEMMA_MAX_LENGTH = 16  # suggested `max_sequence_length` (Gemma tokens after the instruction) for the tiny model

GEMMA_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                    bos_token_id=2)
TRANSFORMER_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
    caption_channels=GEMMA_CONFIG["hidden_size"], sample_size=32, patch_size=1,
)
VAE_CONFIG = dict(
    in_channels=3, latent_channels=4, attention_head_dim=4,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    upsample_block_type="interpolate", downsample_block_type="conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                        flow_shift=3.0, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")


def _training_corpus() -> list[str]:
    import inspect

    from diffusers import SanaPipeline

    from flowrl.shapes.prompts import all_metadata

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return [m["prompt"] for m in all_metadata()] + list(chi)


def write_tiny_gemma_tokenizer(out_dir: str | Path, vocab_size: int = 600):
    """Train a small BPE tokenizer offline and save it as a ``transformers.GemmaTokenizer`` in ``out_dir``.

    The corpus is the shapes-domain prompts plus the complex human instruction ``SanaPipeline`` prepends to every
    prompt (so that instruction is a few hundred tokens, not a thousand characters). Spaces are ``▁`` as in
    Gemma/SentencePiece; unknown characters fall back to the ``<0xNN>`` byte tokens.

    Returns:
        the ``GemmaTokenizer`` loaded back from ``out_dir`` (its ``len`` is the tiny Gemma's vocabulary size).
    """
    import json

    from tokenizers import Tokenizer, models, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + bytes_, show_progress=False,
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz"))
    words = [("▁" if i else "") + w for text in _training_corpus() for i, w in enumerate(text.split(" "))]
    bpe.train_from_iterator(words, trainer=trainer)  # one word per sample: no merge crosses a space
    model = bpe.get_vocab()
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = GemmaTokenizer(vocab=model, merges=merges, add_bos_token=True, add_eos_token=False)
    out_dir = Path(out_dir)
    tok.save_pretrained(out_dir)
    return GemmaTokenizer.from_pretrained(out_dir)


def build_tiny_sana_pipeline(tokenizer_dir: str | Path, seed: int = 0):
    """A randomly initialised tiny ``diffusers.SanaPipeline`` (see the module docstring for its components).

    Args:
        tokenizer_dir: scratch folder where the tokenizer files are written.
        seed: ``torch.manual_seed`` for all random weights.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = write_tiny_gemma_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    gemma = Gemma2Model(Gemma2Config(vocab_size=len(tok), **GEMMA_CONFIG))
    transformer = SanaTransformer2DModel(**TRANSFORMER_CONFIG)
    vae = AutoencoderDC(**VAE_CONFIG)
    for m in (gemma, transformer, vae):
        m.eval()
    return SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG))


def tiny_random_sana_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random SANA pipeline to ``path`` (tokenizer scratch files go beside it, in ``<path>_tokenizer``).

    Returns:
        ``path``; ``diffusers.SanaPipeline.from_pretrained(path)`` loads it offline and
        :meth:`flowrl.models.sana.SanaAdapter.from_pretrained` wraps it (use ``max_sequence_length=GEMMA_MAX_LENGTH``).
    """
    path = Path(path)
    build_tiny_sana_pipeline(path.parent / (path.name + "_tokenizer"), seed).save_pretrained(path)
    return path
