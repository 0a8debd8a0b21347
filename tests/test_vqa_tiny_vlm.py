"""Shapes VQA data and the tiny Qwen2-VL (embedded default VLM): answers re-derived independently from the objects
and from the rendered pixels (classical detector), disjoint and balanced splits, answer normalisation, and the tiny
model's real transformers code paths (save → ``from_pretrained`` round trip, image-token expansion, a forward pass,
generation, a few SFT steps). Offline, CPU, random weights."""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from flowrl.shapes.detect import detect
from flowrl.shapes.render import render_scene
from flowrl.text.vqa import (TAGS, answer_space, make_vqa, normalize_answer, objects_from_record, parse_answer,
                             read_jsonl, reasoning_text, render_record, scene_key, target_text, write_jsonl)

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)

COUNT_Q = re.compile(r"How many (?:(\w+) )?(\w+)s are there\?")
COLOR_Q = re.compile(r"What color is the (\w+)\?")
SHAPE_Q = re.compile(r"What shape is the (\w+) object\?")
POS_Q = re.compile(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?")
EXISTS_Q = re.compile(r"Is there an? (\w+) (\w+)\?")


def relations(ca, da, cb, db, cos=0.5):
    """GenEval's relative-position rule, written out again here (threshold 0.1, image y downwards)."""
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = [max(abs(o) - 0.1 * (a + b), 0.0) * math.copysign(1, o) for o, a, b in zip(off, da, db)]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    return {n for n, ok in (("left of", dx < -cos), ("right of", dx > cos), ("above", dy < -cos),
                            ("below", dy > cos)) if ok}


def answer_from(question, items, cos=0.5):
    """Answer ``question`` from ``items = [(shape, colour, (cx, cy), (w, h))]`` (objects or detections)."""
    if m := COUNT_Q.fullmatch(question):
        color, shape = m.groups()
        return str(sum(s == shape and (color is None or c == color) for s, c, _, _ in items))
    if m := COLOR_Q.fullmatch(question):
        found = [c for s, c, _, _ in items if s == m[1]]
        assert len(found) == 1, question
        return found[0]
    if m := SHAPE_Q.fullmatch(question):
        found = [s for s, c, _, _ in items if c == m[1]]
        assert len(found) == 1, question
        return found[0]
    if m := POS_Q.fullmatch(question):
        ca, sa, rel, cb, sb = m.groups()
        a = [it for it in items if it[:2] == (sa, ca)]
        b = [it for it in items if it[:2] == (sb, cb)]
        assert len(a) == len(b) == 1, question
        return "yes" if rel in relations(a[0][2], a[0][3], b[0][2], b[0][3], cos) else "no"
    if m := EXISTS_Q.fullmatch(question):
        return "yes" if any((s, c) == (m[2], m[1]) for s, c, _, _ in items) else "no"
    raise AssertionError(f"unrecognised question {question!r}")


def object_items(rec):
    return [(o["shape"], o["color"], (o["cx"], o["cy"]), (o["size"], o["size"])) for o in rec["objects"]]


@pytest.fixture(scope="module")
def records():
    return make_vqa(250, seed=3, split="train") + make_vqa(250, seed=3, split="test")


# --------------------------------------------------------------------------------------------------------------------
# VQA data
# --------------------------------------------------------------------------------------------------------------------

def test_answers_rederived_from_objects(records):
    for rec in records:
        assert rec["answer"] in answer_space(rec["tag"])
        assert answer_from(rec["question"], object_items(rec)) == rec["answer"], rec
        if rec["tag"] == "position":  # no borderline layouts: a "yes" holds at cosine 0.7, a "no" fails even at 0.3
            cos = 0.7 if rec["answer"] == "yes" else 0.3
            assert answer_from(rec["question"], object_items(rec), cos=cos) == rec["answer"]


def test_answers_rederived_from_pixels(records):
    """The classical shapes detector reads the rendered image; its detections must give the same answers."""
    agree = 0
    for rec in records:
        img = render_record(rec)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert np.array_equal(img, render_scene(objects_from_record(rec)))
        items = [(d.cls, d.color, tuple(d.center), tuple(d.dims)) for d in detect(img)]
        try:
            agree += answer_from(rec["question"], items) == rec["answer"]
        except AssertionError:
            pass
    assert agree / len(records) >= 0.99


def test_splits_disjoint_deterministic_balanced(records, tmp_path):
    train, test = make_vqa(500, 0, "train"), make_vqa(500, 0, "test")
    assert make_vqa(500, 0, "train") == train
    assert not {r["image_seed"] for r in train} & {r["image_seed"] for r in test}
    assert not {scene_key(r) for r in train} & {scene_key(r) for r in test}
    assert not {r["image_seed"] for r in make_vqa(100, 1, "test")} & {r["image_seed"] for r in test}
    assert collections.Counter(r["tag"] for r in train) == {t: 100 for t in TAGS}
    for tag in ("position", "exists"):
        yes = np.mean([r["answer"] == "yes" for r in train + test if r["tag"] == tag])
        assert 0.4 < yes < 0.6, (tag, yes)
    counts = collections.Counter(r["answer"] for r in train + test if r["tag"] == "count")
    assert set(counts) == set("01234") and min(counts.values()) >= 25
    write_jsonl(train[:20], tmp_path / "v.jsonl")
    assert read_jsonl(tmp_path / "v.jsonl") == train[:20]
    with pytest.raises(ValueError, match="split"):
        make_vqa(3, 0, "val")


def test_committed_splits_match_generator():
    train_f, test_f = ROOT / "assets" / "vqa" / "vqa_train.jsonl", ROOT / "assets" / "vqa" / "vqa_test.jsonl"
    if not (train_f.is_file() and test_f.is_file()):
        pytest.skip("assets/vqa not written (python scripts/make_vqa.py)")
    train, test = read_jsonl(train_f), read_jsonl(test_f)
    assert train[:50] == make_vqa(50, 0, "train") and test[-5:] == make_vqa(len(test), 0, "test")[-5:]
    assert not {scene_key(r) for r in train} & {scene_key(r) for r in test}


@pytest.mark.parametrize("text, expected", [
    ("Two.", "2"), (" FOUR ", "4"), ("zero", "0"), ("3", "3"), ("Yes!", "yes"), ("no.", "no"),
    ("The Circle", "circle"), ("a red", "red"), ("an orange", "orange"), ("  Blue  ", "blue"), (None, ""),
    ("two stars", "2 stars"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_targets_and_parsing(records):
    for rec in records[:50]:
        t = target_text(rec)
        assert t.startswith("<think>") and t.endswith(f"</think><answer>{rec['answer']}</answer>")
        assert parse_answer(t) == rec["answer"] and reasoning_text(rec) in t
    assert parse_answer("<answer>a</answer> x <answer> Two </answer>") == "Two"
    assert parse_answer("<think>no answer</think>") is None and parse_answer("<answer>cut") is None


# --------------------------------------------------------------------------------------------------------------------
# Tiny Qwen2-VL
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flowrl.text.tiny_qwen2vl import build_tiny_qwen2vl

    path = tmp_path_factory.mktemp("vlm") / "tiny_qwen2vl"
    model, processor = build_tiny_qwen2vl(path, seed=0)
    return path, model.eval(), processor


@pytest.fixture(scope="module")
def sft_script():
    spec = importlib.util.spec_from_file_location("pretrain_vlm_script", ROOT / "scripts" / "pretrain_vlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_folder_reloads_like_qwen2vl(tiny, records, sft_script):
    from transformers import (AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast,
                              Qwen2VLForConditionalGeneration, Qwen2VLProcessor)

    from flowrl.text.tiny_qwen2vl import load_processor, torchvision_available

    path, model, processor = tiny
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja"} <= {p.name for p in path.iterdir()}
    assert AutoConfig.from_pretrained(path).model_type == "qwen2_vl"
    assert isinstance(AutoTokenizer.from_pretrained(path), PreTrainedTokenizerFast)
    assert AutoImageProcessor.from_pretrained(path).patch_size == 8
    model2 = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    processor2 = load_processor(path)
    assert isinstance(processor2, Qwen2VLProcessor)
    if torchvision_available():
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(path)) is Qwen2VLProcessor
    recs = records[:4]
    b1 = sft_script.sft_batch(processor, recs)
    b2 = sft_script.sft_batch(processor2, recs)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    with torch.no_grad():
        assert torch.allclose(model(**b1).logits, model2(**b2).logits, atol=1e-6)
    n_params = sum(p.numel() for p in model2.parameters())
    assert 1e6 <= n_params <= 4e6


def test_chat_template_and_tokenizer(tiny):
    from flowrl.text.tiny_qwen2vl import vqa_messages

    _, _, processor = tiny
    tok = processor.tokenizer
    text = processor.apply_chat_template(vqa_messages("How many red stars are there?"), add_generation_prompt=True,
                                         tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>How many red stars are there?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert len(tok("How many red stars are there?")["input_ids"]) == 7  # one token per word + "?"
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<think>", "</answer>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("<think>I see 2 red stars.</think><answer>2</answer><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>I see 2 red stars.</think><answer>2</answer>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    odd = "Ünïcode & $ymbols 123"  # any text encodes and decodes (byte-level)
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_forward_with_image_tokens(tiny, records, sft_script):
    from flowrl.text.tiny_qwen2vl import num_image_tokens

    _, model, processor = tiny
    cfg = model.config
    recs = records[:3]
    batch = processor(text=sft_script.prompt_texts(processor, recs), images=sft_script.images_of(recs),
                      padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    assert num_image_tokens(processor) == 16
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3 and batch["pixel_values"].shape == (3 * 64, 384)
    for row in ids:
        pos = (row == cfg.image_token_id).nonzero().flatten()
        assert len(pos) == 16 and torch.equal(pos, torch.arange(pos[0], pos[0] + 16))  # one contiguous block
        assert row[pos[0] - 1] == cfg.vision_start_token_id and row[pos[-1] + 1] == cfg.vision_end_token_id
    with torch.no_grad():
        out = model(**batch)
        assert out.logits.shape == (3, ids.shape[1], cfg.text_config.vocab_size)
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[0] == 3 and torch.equal(gen[:, :ids.shape[1]], ids)


def test_sft_steps_lower_loss(records, sft_script):
    from flowrl.text.tiny_qwen2vl import build_tiny_qwen2vl

    model, processor = build_tiny_qwen2vl(seed=1)
    recs = records[:8]
    batch = sft_script.sft_batch(processor, recs)
    tok = processor.tokenizer
    n_target = [len(tok(target_text(r) + "<|im_end|>")["input_ids"]) for r in recs]
    assert (batch["labels"] != -100).sum(1).tolist() == n_target
    opt = sft_script.make_optimizer(model, lr=3e-3)
    losses = [sft_script.sft_step(model, batch, opt) for _ in range(5)]
    with torch.no_grad():
        model.eval()
        final = float(model(**batch).loss)
    assert all(math.isfinite(v) for v in losses)
    assert final < losses[0] - 0.5, (losses, final)
