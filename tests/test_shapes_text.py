"""Text rendering in the shapes domain (flowrl.shapes.text): signs, OCR prompt splits, and the OCR reward on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flowrl.shapes.render import BACKGROUND, COLORS
from flowrl.shapes.text import (HELDOUT_WORDS, RL_WORDS, TEXT_COLOR, WORDS, TextSign, make_text_splits,
                                render_text_scene, sign_box, sign_for_metadata, text_prompts)
from flowrl_rewards.ocr import OCRReward, target_text


def test_signs_fit_the_image_and_carry_their_colours():
    rng = np.random.default_rng(0)
    for word in WORDS:
        for color in ("blue", "yellow", None):
            sign = sign_for_metadata({"text": word, "color": color}, rng)
            x0, y0, x1, y1 = sign_box(sign)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64, (word, sign)
            assert color is None or sign.color == color
    img = render_text_scene([TextSign("STOP", "red", 32, 32)])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[1, 1]) == BACKGROUND
    # the sign colour and the (white) text colour both occur, and the text makes the sign non-uniform
    px = img.reshape(-1, 3).astype(int)
    assert (np.abs(px - COLORS["red"]).sum(1) < 10).sum() > 100
    assert (np.abs(px - COLORS[TEXT_COLOR["red"]]).sum(1) < 30).sum() > 20
    assert not np.array_equal(img, render_text_scene([TextSign("SHOP", "red", 32, 32)]))


def test_bad_sign_input():
    with pytest.raises(ValueError, match="unknown sign colour"):
        render_text_scene([TextSign("CAT", "teal", 32, 32)])
    with pytest.raises(ValueError, match="no 'text'"):
        sign_for_metadata({"prompt": "a sign"}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not fit"):
        sign_for_metadata({"text": "W" * 40}, np.random.default_rng(0), image_size=16)


def test_splits_are_disjoint_and_tagged():
    sp = make_text_splits()
    test_prompts = {r["prompt"] for r in sp["test"]}
    assert not test_prompts & {r["prompt"] for r in sp["pretrain"]}
    assert {r["prompt"] for r in sp["train"]} <= {r["prompt"] for r in sp["pretrain"]}
    assert {r["text"] for r in sp["train"]} == set(RL_WORDS) and not set(HELDOUT_WORDS) & set(RL_WORDS)
    assert {r["text"] for r in sp["test"]} == set(WORDS) and len(sp["test"]) == 4 * len(WORDS)
    for r in sp["test"]:
        assert r["tag"] == ("ocr_new_word" if r["text"] in HELDOUT_WORDS else "ocr")
        assert target_text(r["prompt"]) == r["text"] == target_text("", r)
        if r["color"]:
            assert r["color"] in r["prompt"]
    assert len(text_prompts(("CAT",))) == len(set(p["prompt"] for p in text_prompts(("CAT",))))
    assert make_text_splits() == sp  # deterministic


def test_committed_prompt_files_match_the_generator():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "assets" / "prompts"
    sp = make_text_splits()
    for name in ("pretrain", "train", "test"):
        rows = [json.loads(line) for line in (root / f"text_{name}.jsonl").read_text().splitlines() if line]
        assert rows == sp[name], name


def test_ocr_reward_passes_detection_switches_to_the_engine():
    seen = []

    class Stub:
        def __call__(self, image, **kwargs):
            seen.append(kwargs)
            return type("R", (), {"txts": ("CAT",)})()

    OCRReward(engine=Stub())(np.zeros((1, 8, 8, 3), np.uint8), ['"CAT"'])
    OCRReward(engine=Stub(), use_det=False, use_cls=False)(np.zeros((1, 8, 8, 3), np.uint8), ['"CAT"'])
    assert seen == [{}, {"use_det": False, "use_cls": False}]


@pytest.mark.parametrize("use_det", [True, False])
def test_real_ocr_reads_clean_sign_scenes(use_det):
    pytest.importorskip("rapidocr", reason="install flowrl[ocr] (rapidocr + onnxruntime) for the OCR engine")
    rng = np.random.default_rng(3)
    recs = make_text_splits()["test"][::4]
    imgs = np.stack([render_text_scene([sign_for_metadata(r, rng)]) for r in recs])
    ocr = OCRReward(use_det=use_det, use_cls=use_det)
    out = ocr(imgs, [r["prompt"] for r in recs], recs)
    # measured on this machine: 0.98 (detection) and 0.90 (recognition only) of clean renders are read exactly
    assert out["exact"].mean() >= 0.8
    shuffled = ocr(imgs, [r["prompt"] for r in recs[1:] + recs[:1]], recs[1:] + recs[:1])
    assert shuffled["reward"].mean() < 0.5
