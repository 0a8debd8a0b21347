"""The VLM policy: batched chat prompts with images, temperature sampling, and per-token log-probabilities that match
the sampling distribution exactly.

A generated token is a step: :meth:`VLMPolicy.token_log_probs` returns ``log_probs [B, L]`` and ``mask [B, L]`` of the
completion, the same layout as a denoising trajectory's per-step log-probs, so :mod:`flowrl.core`'s advantages,
policy losses, KL estimators and loss aggregation apply unchanged.

The sampling distribution is ``softmax(logits / T)`` with the *banned* tokens (every vision special token:
``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``) set to ``-inf``, and nothing else
(``top_k = 0``, ``top_p = 1``): generation passes exactly those settings to ``model.generate`` and
:meth:`VLMPolicy.token_log_probs` recomputes the same distribution from a full forward pass, at the same temperature
and in float32, so the importance ratio of an unchanged policy is exactly 1 (verl/TRL compute log-probs the same way;
sampling with top-k/top-p while scoring the full softmax would bias every ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass
class Completions:
    """Sampled completions of one micro-batch.

    Attributes:
        ids: ``[B, L]`` long token ids (``pad`` after the end-of-turn token).
        mask: ``[B, L]`` bool, True for generated tokens up to and including the first end-of-sequence token.
        text: decoded completions (special tokens skipped; ``<think>``/``<answer>`` tags kept).
        truncated: ``[B]`` bool, the completion hit ``max_new_tokens`` without an end-of-sequence token.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    text: list[str]
    truncated: torch.Tensor


class VLMPolicy:
    """A Qwen2-VL-style ``*ForConditionalGeneration`` model + processor as a token-level policy.

    Args:
        model: a transformers vision-language model (Qwen2-VL / Qwen2.5-VL class) possibly wrapped by peft.
        processor: its processor (tokenizer + image processor + chat template).
        temperature: sampling temperature ``T > 0`` (rollouts and log-probs).
        max_new_tokens: completion length limit ``L``.
        system: optional system message for the chat template.

    Raises:
        ValueError: ``temperature <= 0`` or ``max_new_tokens < 1``.
    """

    def __init__(self, model, processor, temperature: float = 1.0, max_new_tokens: int = 48,
                 system: str | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for greedy decoding")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1 (got {max_new_tokens})")
        self.model, self.processor = model, processor
        self.temperature, self.max_new_tokens, self.system = float(temperature), int(max_new_tokens), system
        tok = processor.tokenizer
        tok.padding_side = "left"
        self.tokenizer = tok
        vocab = tok.get_vocab()
        self.banned = sorted(vocab[t] for t in VISION_TOKENS if t in vocab)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        for t in ("<|im_end|>", "<|endoftext|>"):
            if t in vocab and vocab[t] not in eos:
                eos.append(vocab[t])
        if not eos:
            raise ValueError("the model's generation_config has no eos_token_id and the tokenizer has no <|im_end|>")
        self.eos = eos
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else eos[-1]
        cfg = getattr(model.config, "text_config", model.config)
        self.context = int(getattr(cfg, "max_position_embeddings", 1 << 30))

    # -- prompts --------------------------------------------------------------------------------------------------
    def prompt_inputs(self, images: list[np.ndarray], questions: list[str]) -> dict:
        """Tokenised chat prompts (left-padded) with their images.

        Args:
            images: ``B`` uint8 ``[H, W, 3]`` RGB arrays; questions: ``B`` strings.

        Returns:
            The processor's batch (``input_ids``/``attention_mask`` ``[B, P]``, ``pixel_values``, ``image_grid_thw``).

        Raises:
            ValueError: a missing image (``None``), a count mismatch, or a prompt so long that ``P + max_new_tokens``
                exceeds the model's context (says which prompt and by how much).
        """
        from PIL import Image

        from flowrl.text.tiny_qwen2vl import vqa_messages

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        for i, im in enumerate(images):
            if im is None:
                raise ValueError(f"sample {i} ({questions[i]!r}) has no image; every VQA record needs one")
        texts = [self.processor.apply_chat_template(vqa_messages(q, self.system), tokenize=False,
                                                    add_generation_prompt=True) for q in questions]
        pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        enc = self.processor(text=texts, images=pil, return_tensors="pt", padding=True)
        lengths = enc["attention_mask"].sum(1)
        too_long = torch.nonzero(lengths + self.max_new_tokens > self.context).flatten().tolist()
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {i} ({questions[i][:60]!r}...) has {int(lengths[i])} tokens; with "
                             f"max_new_tokens={self.max_new_tokens} that exceeds the model's context of {self.context} "
                             "tokens: shorten the question or lower max_new_tokens")
        return dict(enc)

    # -- sampling -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: dict, seed: int, greedy: bool = False) -> Completions:
        """Sample (or greedily decode) one completion per prompt.

        Args:
            inputs: :meth:`prompt_inputs`'s batch. seed: ``torch.manual_seed`` before sampling (reproducible rollouts).
            greedy: argmax decoding (evaluation); the banned tokens are still suppressed.
        """
        self.model.eval()
        torch.manual_seed(seed)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=self.temperature, top_k=0,
                                                       top_p=1.0)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, suppress_tokens=self.banned,
                                  eos_token_id=self.eos, pad_token_id=self.pad, repetition_penalty=1.0, **kw)
        p = inputs["input_ids"].shape[1]
        ids = out[:, p:]
        if ids.shape[1] == 0:
            ids = torch.full((out.shape[0], 1), self.pad, dtype=out.dtype)
        is_eos = torch.isin(ids, torch.tensor(self.eos))
        # mask: tokens up to and including the first eos
        before = torch.cumsum(is_eos.int(), 1) - is_eos.int() == 0
        mask = before.clone()
        truncated = ~is_eos.any(1)
        ids = torch.where(mask, ids, torch.full_like(ids, self.pad))
        text = self.tokenizer.batch_decode(torch.where(mask, ids, self.pad), skip_special_tokens=True)
        return Completions(ids=ids, mask=mask, text=[t.strip() for t in text], truncated=truncated)

    # -- scoring --------------------------------------------------------------------------------------------------
    def token_log_probs(self, inputs: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities of completions under the sampling distribution (see the module docstring).

        Args:
            inputs: the prompts' batch (:meth:`prompt_inputs`); ids/mask: ``[B, L]`` completions (:class:`Completions`).

        Returns:
            ``[B, L]`` float32 ``log π(y_t | prompt, y_<t)`` at temperature ``T``; 0 where ``mask`` is False.
            Differentiable (call under ``torch.no_grad()`` for old / reference log-probs).
        """
        p = inputs["input_ids"].shape[1]
        full_ids = torch.cat([inputs["input_ids"], ids], 1)
        attn = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], 1)
        extra = {}
        for k, v in inputs.items():
            if k in ("input_ids", "attention_mask"):
                continue
            if torch.is_tensor(v) and v.dim() == 2 and v.shape == inputs["input_ids"].shape:  # per-token (e.g.
                v = torch.cat([v, torch.zeros_like(ids, dtype=v.dtype)], 1)  # mm_token_type_ids): text = 0
            extra[k] = v
        logits = self.model(input_ids=full_ids, attention_mask=attn, **extra, use_cache=False).logits
        logits = logits[:, p - 1 : -1].float() / self.temperature
        if self.banned:
            logits[..., self.banned] = float("-inf")
        lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, lp, torch.zeros_like(lp))
