"""Verifiable text rewards for the VLM branch: exact-match answer accuracy, the reasoning format, and DAPO's soft
overlong penalty.

Same reward protocol as the image rewards (:mod:`flowrl.rewards`), with text in place of images:
``reward(completions, prompts, metadata) -> {"reward": [B], ...}`` where ``completions`` are the B decoded
completions and ``metadata[i]`` the sample's record (``answer`` for accuracy; ``completion_tokens`` and
``max_new_tokens``, filled in by the VLM trainer, for the overlong penalty). They combine with ``reward=multi`` like
any other reward.
"""

from __future__ import annotations

import numpy as np

from flowrl.text.vqa import is_formatted, normalize_answer, parse_answer


def _require(metadata, n: int, key: str, reward: str) -> list:
    if metadata is None or len(metadata) != n:
        raise ValueError(f"reward {reward!r} needs one metadata record per completion (got "
                         f"{None if metadata is None else len(metadata)} for {n})")
    missing = [i for i, m in enumerate(metadata) if key not in m]
    if missing:
        raise ValueError(f"reward {reward!r}: metadata record {missing[0]} has no {key!r}")
    return [m[key] for m in metadata]


class VQAAccuracy:
    """Exact match of the last ``<answer>…</answer>`` with ``metadata["answer"]`` after
    :func:`~flowrl.text.vqa.normalize_answer` (1 or 0; a completion without an answer tag scores 0, or is scored on
    its whole text with ``require_tags=False``). Columns: ``reward``, ``answered`` (an answer was found).

    Raises:
        ValueError: missing metadata or an empty reference answer (the record cannot be scored).
    """

    name = "vqa_accuracy"

    def __init__(self, require_tags: bool = True):
        self.require_tags = bool(require_tags)

    def __call__(self, completions, prompts, metadata) -> dict[str, np.ndarray]:
        answers = _require(metadata, len(completions), "answer", self.name)
        reward, answered = np.zeros(len(completions), np.float32), np.zeros(len(completions), np.float32)
        for i, (text, ref) in enumerate(zip(completions, answers)):
            ref_n = normalize_answer(ref)
            if not ref_n:
                raise ValueError(f"reward {self.name!r}: record {i} has an empty reference answer {ref!r}")
            got = parse_answer(text)
            if got is None and not self.require_tags:
                got = text
            answered[i] = got is not None and normalize_answer(got) != ""
            reward[i] = float(got is not None and normalize_answer(got) == ref_n)
        return {"reward": reward, "answered": answered}


class VQAFormat:
    """1 if the completion is exactly ``<think>…</think><answer>…</answer>`` (non-empty parts, whitespace allowed
    between and around), else 0 (DeepSeek-R1's format reward). Column: ``reward``."""

    name = "vqa_format"

    def __call__(self, completions, prompts, metadata=None) -> dict[str, np.ndarray]:
        return {"reward": np.array([float(is_formatted(t)) for t in completions], np.float32)}


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, Eq. 13) on the completion length ``L`` in
    tokens (``metadata["completion_tokens"]``), with ``L_max`` = ``max_length`` (default: the record's
    ``max_new_tokens``) and ``L_cache`` = ``buffer``::

        0                               if L ≤ L_max - L_cache
        ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L ≤ L_max
        -1                              if L > L_max

    A completion truncated at ``max_new_tokens`` has ``L = max_new_tokens`` (so -1 only if ``max_length`` is below it).
    Columns: ``reward`` in ``[-1, 0]``, ``length`` (tokens).

    Raises:
        ValueError: ``buffer`` not in ``[1, max_length]``, or missing metadata.
    """

    name = "overlong"

    def __init__(self, buffer: int = 8, max_length: int | None = None):
        if buffer < 1 or (max_length is not None and buffer > max_length):
            raise ValueError(f"overlong: buffer must be in [1, max_length] (got {buffer}, {max_length})")
        self.buffer, self.max_length = int(buffer), max_length

    def __call__(self, completions, prompts, metadata) -> dict[str, np.ndarray]:
        lengths = np.asarray(_require(metadata, len(completions), "completion_tokens", self.name), np.float32)
        if self.max_length is not None:
            l_max = np.full(len(lengths), float(self.max_length), np.float32)
        else:
            l_max = np.asarray(_require(metadata, len(completions), "max_new_tokens", self.name), np.float32)
        start = l_max - self.buffer
        r = np.where(lengths <= start, 0.0, np.where(lengths <= l_max, (start - lengths) / self.buffer, -1.0))
        return {"reward": r.astype(np.float32), "length": lengths}
