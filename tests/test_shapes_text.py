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
    # measured by scripts/evaluate_text_domain.py: 1.00 (detection) and 0.93 (recognition only) read exactly
    assert out["exact"].mean() >= 0.8
    shuffled = ocr(imgs, [r["prompt"] for r in recs[1:] + recs[:1]], recs[1:] + recs[:1])
    assert shuffled["reward"].mean() < 0.5


def test_shipped_text_vae_reconstructs_signs_and_shapes():
    """assets/shapes-vae-text (the shapes VAE fine-tuned on half sign scenes) keeps words readable and shapes
    detectable through encode → decode; the shipped shapes VAE does not keep the words."""
    pytest.importorskip("rapidocr", reason="install flowrl[ocr] (rapidocr + onnxruntime) for the OCR engine")
    import torch
    from diffusers import AutoencoderKL

    from flowrl.geneval.scoring import evaluate_strict
    from flowrl.shapes.detect import detect
    from flowrl.shapes.prompts import split_metadata
    from flowrl.shapes.render import render_scene, scene_for_metadata

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "assets"
    rng = np.random.default_rng(5)
    recs = make_text_splits()["test"][::3]
    signs = np.stack([render_text_scene([sign_for_metadata(r, rng)]) for r in recs])
    shapes_md = split_metadata()[1][::4]
    shapes = np.stack([render_scene(scene_for_metadata(m, rng)) for m in shapes_md])

    def roundtrip(vae, imgs):
        with torch.no_grad():
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
        return ((y.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()

    ocr = OCRReward()
    prompts = [r["prompt"] for r in recs]
    text_vae = AutoencoderKL.from_pretrained(root / "shapes-vae-text")
    assert ocr(roundtrip(text_vae, signs), prompts, recs)["exact"].mean() >= 0.85  # measured 1.00 on all 96
    assert np.mean([evaluate_strict(m, detect(im))[0]
                    for m, im in zip(shapes_md, roundtrip(text_vae, shapes))]) >= 0.9  # measured 1.00 on all 108
    shapes_vae = AutoencoderKL.from_pretrained(root / "shapes-sd3" / "vae")
    assert ocr(roundtrip(shapes_vae, signs), prompts, recs)["exact"].mean() <= 0.5  # measured 0.19 on all 96


def test_char_t5_sees_the_letters_of_the_quoted_word(tmp_path):
    """The character-level T5-slot encoder (tiny_sd3.char_t5) splits a quoted word into its letters, so "CAT" and
    "COT" differ in exactly one input token (CLIP's BPE gives one token per word), and a tiny SD3 pipeline carrying it
    appends its ``CHAR_T5_LENGTH`` token embeddings after the 16 CLIP tokens."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from flowrl.models.tiny_sd3 import CHAR_T5_LENGTH, build_pipeline, char_t5

    t5, tok = char_t5(tmp_path / "t5tok", seed=0)
    cat, cot = tok('a sign that says "CAT"')["input_ids"], tok('a sign that says "COT"')["input_ids"]
    assert tok.convert_ids_to_tokens(cat)[-6:] == ['"', "C", "A", "T", '"', "</s>"]
    assert tok.unk_token_id not in cat and len(cat) == len(cot)
    assert [i for i, (a, b) in enumerate(zip(cat, cot)) if a != b] == [len(cat) - 4]
    pipe = build_pipeline(None, tmp_path / "tok", seed=0)
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": t5, "tokenizer_3": tok})
    with torch.no_grad():
        emb, _, _, _ = pipe.encode_prompt(prompt=['a sign that says "CAT"', 'a sign that says "COT"'], prompt_2=None,
                                          prompt_3=None, do_classifier_free_guidance=False,
                                          max_sequence_length=CHAR_T5_LENGTH)
    assert emb.shape == (2, 16 + CHAR_T5_LENGTH, 48)
    assert not torch.allclose(emb[0, 16:], emb[1, 16:])


def test_shipped_text_base_writes_the_quoted_word():
    """``assets/shapes-sd3-text`` loads as a plain diffusers pipeline with its character T5, its glyphs depend on the
    quoted word (same seed, different words → different text), and the OCR reward reads part of the word on held-out
    prompts — far above what a generic text texture scores (the T3/T4 bases of docs/runs.md: ≤ 0.03)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from flowrl.models.tiny_sd3 import CHAR_T5_LENGTH

    pipe = StableDiffusion3Pipeline.from_pretrained("assets/shapes-sd3-text")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3.config.num_layers > 1  # the trained character encoder, not the zero stub

    def sample(prompts, seeds):  # one generator per image: each image is what a single-prompt call would give
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return (pipe(prompts, num_inference_steps=20, guidance_scale=4.5, generator=gens, height=64, width=64,
                     max_sequence_length=CHAR_T5_LENGTH, output_type="np").images * 255).round().astype(np.uint8)

    cat, zoo = sample(['a white sign that says "CAT"', 'a white sign that says "ZOO"'], seeds=[0, 0])
    diff = np.abs(cat.astype(int) - zoo.astype(int)).mean()
    assert diff > 2.0  # the word changes the image, not only the seed
    test = make_text_splits()["test"][::4][:24]  # one prompt per word
    imgs = sample([m["prompt"] for m in test], seeds=range(len(test)))
    out = OCRReward()(imgs, [m["prompt"] for m in test], test)
    assert float(np.mean(out["reward"])) > 0.15
