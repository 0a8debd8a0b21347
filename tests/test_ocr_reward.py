"""OCR reward: Flow-GRPO's formula on known cases, target extraction, and the real offline engine on rendered words."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from flowrl_rewards.ocr import OCRReward, levenshtein, ocr_score, target_text


def test_formula_on_known_cases():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_score("Open Sign HELLO world", "hello") == 1.0  # substring after lower-casing and removing spaces
    assert ocr_score("HELO", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("", "hello") == 0.0  # distance capped at len(target)
    assert ocr_score("zzzzzzzzzzzz", "hi") == 0.0
    assert ocr_score("H E L L O", "hello") == 1.0


def test_target_extraction_and_bad_prompts():
    assert target_text('A neon sign that says "Good Luck" at night') == "Good Luck"
    assert target_text("a sign saying “OPEN” ") == "OPEN"
    assert target_text("no quotes here", {"text": "meta"}) == "meta"
    with pytest.raises(ValueError, match="double quotes"):
        target_text("a sign with no target")


def test_engine_failure_scores_zero_and_stub_engine_is_used():
    class Stub:
        def __call__(self, image):
            if image.mean() > 200:
                raise RuntimeError("engine crashed")
            return type("R", (), {"txts": ("HELL",)})()

    r = OCRReward(engine=Stub())
    imgs = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
    out = r(imgs, ['"hello"', '"hello"'])
    assert out["reward"].tolist() == pytest.approx([0.8, 0.0]) and out["exact"].tolist() == [0.0, 0.0]


def _render(word: str, size: int = 128) -> np.ndarray:
    img = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(img).text((8, size // 2 - 14), word, fill=(255, 255, 255), font=ImageFont.load_default(size=26))
    return np.asarray(img)


def test_real_offline_engine_reads_rendered_words():
    pytest.importorskip("rapidocr", reason="install flowrl[ocr] (rapidocr + onnxruntime) for the OCR engine")
    r = OCRReward()
    words = ["HELLO", "OPEN", "CAFE"]
    out = r(np.stack([_render(w) for w in words]), [f'a sign that says "{w}"' for w in words])
    assert out["exact"].mean() >= 2 / 3  # clean renders are read (exactly, in the measurement on this machine)
    wrong = r(np.stack([_render("HELLO")]), ['a sign that says "WORLD"'])
    assert wrong["reward"][0] < 0.5
