"""Builders of the tiny Qwen2-VL used as the embedded default VLM (the policy of the VLM text branch) and in tests.

Real transformers classes at toy sizes, saved in the layout of ``Qwen/Qwen2-VL-2B-Instruct`` so that the same calls
load it (``Qwen2VLForConditionalGeneration.from_pretrained(path)``, ``AutoProcessor.from_pretrained(path)``):

- ``Qwen2VLForConditionalGeneration``: a ViT of depth 2, width 64, 4 heads, 8×8 patches (temporal patch 2: a still
  image is repeated twice, as in Qwen2-VL), whose 2×2 patch merger projects to the language model's width; a Qwen2
  decoder of 4 layers, width 128, 4 query / 2 key-value heads (GQA), SwiGLU 512, multimodal RoPE (M-RoPE) with
  sections ``[4, 6, 6]`` (temporal, height, width) of the 16 rotary frequencies; untied input/output embeddings.
  ≈ 1.3 M parameters.
- Image processing: ``Qwen2VLImageProcessor`` with ``patch_size = 8``, ``merge_size = 2`` and ``min_pixels =
  max_pixels = 64·64``, so a 64×64 scene stays 64×64 (``smart_resize`` keeps sides that are multiples of 16 inside the
  pixel range) and becomes an 8×8 grid of patches = **16 image tokens** (``<|image_pad|>``) after the 2×2 merge.
- Tokenizer: a byte-level BPE in Qwen2's own pre-tokenisation (NFC, Qwen2's split regex, byte-level alphabet), trained
  by ``tokenizers`` on the VQA vocabulary (:func:`flowrl.text.vqa.vocabulary_corpus`) and the chat-template words, so
  every domain word is one token and any other text still encodes (byte fallback through the 256-byte alphabet).
  Wrapped as ``PreTrainedTokenizerFast``, with Qwen2-VL's special tokens (``<|endoftext|>`` = pad, ``<|im_start|>``,
  ``<|im_end|>`` = eos, ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``) and the
  reasoning tags ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` as single, *non-special* tokens (they survive
  ``skip_special_tokens=True`` so answers can be parsed from decoded text). Left padding (for batched generation).
- Chat template (:data:`CHAT_TEMPLATE`, written for this project): Qwen2-VL's format
  ``<|im_start|>role\\n…<|im_end|>\\n`` with the default system message "You are a helpful assistant." when none is
  given, ``<|vision_start|><|image_pad|><|vision_end|>`` per image item, and ``<|im_start|>assistant\\n`` as generation
  prompt.

**torchvision.** In transformers 5.23 ``Qwen2VLProcessor`` has a video-processor slot whose class check and loader
need torchvision (``Qwen2VLVideoProcessor`` is a torchvision backend); without it neither ``Qwen2VLProcessor(...)``
nor ``AutoProcessor.from_pretrained`` works for *any* Qwen2-VL checkpoint. This module therefore writes the folder
exactly as for the real model (``processor_class: Qwen2VLProcessor``, a ``video_processor`` entry matching the image
settings), so ``AutoProcessor.from_pretrained(path)`` returns a genuine ``Qwen2VLProcessor`` where torchvision is
installed, and :func:`load_processor` falls back to :class:`Qwen2VLImageProcessorOnly` (a ``Qwen2VLProcessor``
subclass without the video slot: same tokens, template and image path) where it is not.

``scripts/pretrain_vlm.py`` trains the model on :mod:`flowrl.text.vqa`; tests build it with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = ["SPECIAL_TOKENS", "REASONING_TOKENS", "CHAT_TEMPLATE", "DEFAULT_SYSTEM", "TEXT_CONFIG", "VISION_CONFIG",
           "IMAGE_CONFIG", "build_tokenizer", "build_image_processor", "build_processor", "model_config",
           "build_tiny_qwen2vl", "save_tiny_qwen2vl", "load_processor", "load_tiny_qwen2vl", "num_image_tokens",
           "vqa_messages", "Qwen2VLImageProcessorOnly", "torchvision_available"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_SYSTEM = "You are a helpful assistant."

CHAT_TEMPLATE = r"""{%- for message in messages %}
{%- if loop.first and message['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- else %}
{%- for item in message['content'] %}
{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item %}
{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif item['type'] == 'video' or 'video' in item %}
{{- '<|vision_start|><|video_pad|><|vision_end|>' }}
{%- elif item['type'] == 'text' %}
{{- item['text'] }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Language model (Qwen2 decoder). head_dim = 128 / 4 = 32 → 16 rotary frequencies split 4/6/6 over (t, h, w).
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]))
# Vision tower. hidden_size (the merger's output width) is set to the text width by model_config().
VISION_CONFIG = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=4, patch_size=8, spatial_merge_size=2,
                     temporal_patch_size=2, in_channels=3)
IMAGE_SIZE_PIXELS = 64 * 64
IMAGE_CONFIG = dict(min_pixels=IMAGE_SIZE_PIXELS, max_pixels=IMAGE_SIZE_PIXELS)


def torchvision_available() -> bool:
    """Whether torchvision is importable (transformers' ``Qwen2VLProcessor`` needs it for its video slot)."""
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer, image processor, processor
# --------------------------------------------------------------------------------------------------------------------

def build_tokenizer(extra_text: list[str] | None = None, vocab_size: int = 1024):
    """A small byte-level BPE tokenizer for the shapes VQA domain, as a ``PreTrainedTokenizerFast``.

    Trained (deterministically) on :func:`flowrl.text.vqa.vocabulary_corpus`, the system prompt and role names, plus
    ``extra_text``; ``vocab_size`` caps the learned vocabulary (the domain exhausts its merges at ≈ 400). Special and
    reasoning tokens are appended after the learned vocabulary (see the module docstring).

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``eos_token = "<|im_end|>"``, ``pad_token = "<|endoftext|>"``,
        left padding, the chat template :data:`CHAT_TEMPLATE` and ``model_max_length = 512``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from flowrl.text.vqa import vocabulary_corpus

    # Qwen2's pre-tokenisation (the split pattern of transformers' Qwen2Tokenizer: letter runs with an optional
    # leading non-letter, single digits, punctuation runs, newlines, spaces), then the GPT-2 byte-to-unicode map.
    split = PRETOKENIZE_REGEX
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = vocabulary_corpus() + [DEFAULT_SYSTEM, "system\n", "user\n", "assistant\n"] + list(extra_text or [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, padding_side="left", model_max_length=512,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor(**overrides):
    """Qwen2-VL's image processor set up for 64×64 scenes (``patch_size`` 8, ``merge_size`` 2, 64² pixels).

    Uses the PIL backend (``Qwen2VLImageProcessorPil``) when torchvision is missing; both backends save as
    ``Qwen2VLImageProcessor`` and give the same ``pixel_values [N·64, 3·2·8·8]`` and ``image_grid_thw [N, 3]``.
    """
    kw = dict(IMAGE_CONFIG, patch_size=VISION_CONFIG["patch_size"], merge_size=VISION_CONFIG["spatial_merge_size"],
              temporal_patch_size=VISION_CONFIG["temporal_patch_size"])
    kw.update(overrides)
    if torchvision_available():
        from transformers import Qwen2VLImageProcessor as cls
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    return cls(**kw)


class Qwen2VLImageProcessorOnly(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video slot, for environments without torchvision.

    Identical to its parent for text and images (``<|image_pad|>`` expanded to ``image_grid_thw.prod() //
    merge_size²`` tokens, chat template, ``mm_token_type_ids``); ``videos=`` is not supported. It saves as
    ``Qwen2VLProcessor`` (see :func:`save_processor_files`), so a folder it writes is a standard Qwen2-VL folder.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        _standardize_processor_files(save_directory, self.image_processor)
        return out


def _video_processor_dict(image_processor) -> dict:
    """The ``video_processor`` entry of ``processor_config.json``: Qwen2-VL's video processor with the image settings
    (so a frame is tokenised like an image)."""
    ip = image_processor
    return {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": ip.patch_size,
            "temporal_patch_size": ip.temporal_patch_size, "merge_size": ip.merge_size, "size": dict(ip.size),
            "image_mean": list(ip.image_mean), "image_std": list(ip.image_std), "do_resize": True,
            "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "rescale_factor": 1 / 255, "processor_class": "Qwen2VLProcessor"}


def _standardize_processor_files(save_directory, image_processor) -> None:
    """Make a saved processor folder look like Qwen2-VL's: ``processor_class = "Qwen2VLProcessor"`` everywhere and a
    ``video_processor`` entry in ``processor_config.json`` (needed by ``AutoProcessor`` when torchvision is present)."""
    d = Path(save_directory)
    pc = d / "processor_config.json"
    cfg = json.loads(pc.read_text()) if pc.is_file() else {}
    cfg["processor_class"] = "Qwen2VLProcessor"
    cfg.setdefault("video_processor", _video_processor_dict(image_processor))
    pc.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        t = json.loads(tc.read_text())
        t["processor_class"] = "Qwen2VLProcessor"
        tc.write_text(json.dumps(t, indent=2, sort_keys=True) + "\n")


def save_processor_files(processor, save_directory) -> None:
    """``processor.save_pretrained(save_directory)`` followed by the Qwen2-VL standardisation of the files."""
    processor.save_pretrained(save_directory)
    _standardize_processor_files(save_directory, processor.image_processor)


def build_processor(tokenizer=None, image_processor=None):
    """A Qwen2-VL processor around the tiny tokenizer and image processor.

    Returns:
        ``Qwen2VLProcessor`` (with a ``Qwen2VLVideoProcessor`` of the same settings) if torchvision is installed,
        otherwise :class:`Qwen2VLImageProcessorOnly`; both carry :data:`CHAT_TEMPLATE`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = image_processor if image_processor is not None else build_image_processor()
    if torchvision_available():
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        vd = {k: v for k, v in _video_processor_dict(image_processor).items()
              if k not in ("video_processor_type", "processor_class")}
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(**vd), chat_template=CHAT_TEMPLATE)
    return Qwen2VLImageProcessorOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def load_processor(path: str | Path):
    """Load the processor of a saved (tiny or real) Qwen2-VL folder.

    ``AutoProcessor.from_pretrained(path)`` when torchvision is installed; otherwise
    :class:`Qwen2VLImageProcessorOnly` ``.from_pretrained(path)`` (same tokenizer, image processor and template).

    Raises:
        OSError: if ``path`` holds no processor files.
    """
    if torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(path))
    return Qwen2VLImageProcessorOnly.from_pretrained(str(path))


def num_image_tokens(processor, height: int = 64, width: int = 64) -> int:
    """Number of ``<|image_pad|>`` tokens one ``height × width`` image expands to (patches // merge_size²)."""
    ip = processor.image_processor
    return int(ip.get_number_of_image_patches(height, width, {}) // ip.merge_size ** 2)


def vqa_messages(question: str, system: str | None = None) -> list[dict]:
    """Chat messages asking ``question`` about one image (the image itself is passed to the processor separately):
    ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]``, preceded by a system
    message if ``system`` is given (otherwise the template inserts :data:`DEFAULT_SYSTEM`)."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------

def model_config(tokenizer, text: dict | None = None, vision: dict | None = None):
    """``Qwen2VLConfig`` of the tiny model for ``tokenizer`` (vocabulary size and special-token ids taken from it).

    ``text`` / ``vision`` override entries of :data:`TEXT_CONFIG` / :data:`VISION_CONFIG`. The vision tower's output
    width (``vision_config.hidden_size``) is set to the text width.

    Raises:
        ValueError: if the rotary sections don't sum to half the attention head size, or a special token is missing.
    """
    from transformers import Qwen2VLConfig

    t = {**TEXT_CONFIG, **(text or {})}
    v = {**VISION_CONFIG, **(vision or {})}
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    sections = t["rope_parameters"]["mrope_section"]
    if sum(sections) != head_dim // 2:
        raise ValueError(f"mrope_section {sections} must sum to head_dim/2 = {head_dim // 2} "
                         f"(hidden_size {t['hidden_size']} / {t['num_attention_heads']} heads / 2)")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
        raise ValueError(f"tokenizer lacks Qwen2-VL special tokens: {ids}")
    t.update(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
             pad_token_id=ids["<|endoftext|>"])
    v.update(hidden_size=t["hidden_size"])
    return Qwen2VLConfig(text_config=t, vision_config=v, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def save_tiny_qwen2vl(model, processor, out_dir: str | Path) -> Path:
    """Save model + processor into one folder loadable like ``Qwen/Qwen2-VL-2B-Instruct``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor_files(processor, out_dir)
    return out_dir


def build_tiny_qwen2vl(out_dir: str | Path | None = None, seed: int = 0, text: dict | None = None,
                       vision: dict | None = None, **sizes):
    """A randomly initialised tiny ``Qwen2VLForConditionalGeneration`` and its processor (optionally saved).

    Args:
        out_dir: if given, the folder is written there (``save_pretrained`` of model and processor).
        seed: ``torch.manual_seed`` for the weights (the tokenizer is deterministic).
        text, vision: overrides of :data:`TEXT_CONFIG` / :data:`VISION_CONFIG`.
        **sizes: shorthands ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
            ``intermediate_size`` (text) and ``vision_depth``, ``vision_embed_dim``, ``vision_num_heads``,
            ``patch_size`` (vision and image processor), ``mrope_section``.

    Returns:
        ``(model, processor)``: the model in train mode on the CPU in float32 with a ``generation_config`` that stops
        at ``<|im_end|>`` or ``<|endoftext|>``; the processor from :func:`build_processor`.

    Raises:
        TypeError: on an unknown size keyword.
        ValueError: see :func:`model_config`.
    """
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    text, vision = dict(text or {}), dict(vision or {})
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    vision_keys = {"vision_depth": "depth", "vision_embed_dim": "embed_dim", "vision_num_heads": "num_heads",
                   "patch_size": "patch_size"}
    for k, val in sizes.items():
        if k in text_keys:
            text[k] = val
        elif k in vision_keys:
            vision[vision_keys[k]] = val
        elif k == "mrope_section":
            text["rope_parameters"] = {**TEXT_CONFIG["rope_parameters"], "mrope_section": list(val)}
        else:
            known = text_keys + tuple(vision_keys) + ("mrope_section",)
            raise TypeError(f"unknown size {k!r}; expected one of {known}")
    tokenizer = build_tokenizer()
    ip_over = {"patch_size": vision["patch_size"]} if "patch_size" in vision else {}
    processor = build_processor(tokenizer, build_image_processor(**ip_over))
    config = model_config(tokenizer, text, vision)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], bos_token_id=None)
    if out_dir is not None:
        save_tiny_qwen2vl(model, processor, out_dir)
    return model, processor


def load_tiny_qwen2vl(path: str | Path):
    """``(Qwen2VLForConditionalGeneration.from_pretrained(path), load_processor(path))`` (eval mode, float32)."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(str(path))
    return model.eval(), load_processor(path)
