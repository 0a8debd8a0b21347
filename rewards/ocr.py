"""OCR reward (Flow-GRPO's text-rendering reward) with an offline OCR engine.

Definition (Flow-GRPO, ``../shared/REFERENCE.md`` §7): the target is the text between the first pair of double quotes
in the prompt (or ``metadata["text"]``, as ``scripts/evaluate.py`` extracts it from OCR prompt files); the recognised
text and the target are lower-cased with spaces removed; the distance is 0 if the target is a substring of the
recognised text, else the Levenshtein distance capped at ``len(target)``; ``reward = 1 - distance / len(target)``
in ``[0, 1]``; an OCR exception scores 0. Columns: ``reward``, ``exact`` (1 if the distance is 0: OCR accuracy).

Engine: ``rapidocr`` 3.x on ``onnxruntime`` (PP-OCR detection + recognition ONNX models shipped inside the wheel, so
it runs offline), ``Det.limit_side_len`` = 320 for small images. Install: ``pip install "flowrl[ocr]"``.
"""

from __future__ import annotations

import re

import numpy as np

from flowrl_rewards._deps import require

QUOTED = re.compile(r"[\"“”](.+?)[\"“”]")


def target_text(prompt: str, metadata: dict | None = None) -> str:
    """``metadata["text"]`` if present, else the first double-quoted span of ``prompt`` (straight or curly quotes).

    Raises:
        ValueError: neither gives a non-empty target (says how to write an OCR prompt).
    """
    text = (metadata or {}).get("text")
    if not text:
        m = QUOTED.search(prompt or "")
        text = m.group(1) if m else ""
    if not str(text).strip():
        raise ValueError(f"OCR prompt {prompt!r} has no target text: put the word in double quotes, e.g. "
                         "'a sign that says \"HELLO\"', or give metadata['text']")
    return str(text)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character, each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward of one image: ``1 - min(d, len(t)) / len(t)`` on space-free lower-case strings, with
    ``d = 0`` when the target occurs in the recognised text. Returns a value in ``[0, 1]``."""
    rec, tgt = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not tgt:
        return 0.0
    d = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - d / len(tgt)


class OCRReward:
    """Registered as ``ocr``. Args: ``limit_side_len`` (detector input side, default 320), ``engine`` (an object with
    ``__call__(image, **kwargs) -> result with .txts``; tests pass a stub, default: a ``rapidocr.RapidOCR``),
    ``use_det`` / ``use_cls`` (run text detection / the orientation classifier; default True as in Flow-GRPO's
    PaddleOCR reward. With ``use_det=False`` the recogniser reads the whole image as one text line: ~5× faster on
    the 64×64 sign scenes of the embedded domain, where the sign is the only text — see ``reward=ocr_shapes``).

    Raises:
        ImportError: rapidocr / onnxruntime missing (the message gives the pip line).
        ValueError: a prompt without target text.
    """

    name = "ocr"

    def __init__(self, limit_side_len: int = 320, engine=None, use_det: bool = True, use_cls: bool = True):
        self.run_kwargs = {} if (use_det and use_cls) else {"use_det": bool(use_det), "use_cls": bool(use_cls)}
        if engine is None:
            require("onnxruntime", self.name, 'pip install "flowrl[ocr]"')
            rapidocr = require("rapidocr", self.name, 'pip install "flowrl[ocr]"')
            engine = rapidocr.RapidOCR(params={"Det.limit_side_len": int(limit_side_len)})
        self.engine = engine

    def recognise(self, image: np.ndarray) -> str:
        """All text the engine finds in one uint8 ``[H, W, 3]`` image, joined with spaces ("" if none)."""
        out = self.engine(np.ascontiguousarray(image), **self.run_kwargs)
        txts = getattr(out, "txts", None) or ()
        return " ".join(str(t) for t in txts)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None):
        targets = [target_text(p, (metadata or [None] * len(prompts))[i]) for i, p in enumerate(prompts)]
        reward, exact = np.zeros(len(images), np.float32), np.zeros(len(images), np.float32)
        for i, (img, tgt) in enumerate(zip(images, targets)):
            try:
                reward[i] = ocr_score(self.recognise(img), tgt)
            except Exception:  # Flow-GRPO: an OCR failure scores 0 for that image
                reward[i] = 0.0
            exact[i] = float(reward[i] == 1.0)
        return {"reward": reward, "exact": exact}
