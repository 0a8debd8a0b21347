"""GenEval-format prompt sets of the shapes domain: templates, metadata keys, disjoint deterministic splits."""

from __future__ import annotations

import json

import pytest

from flowrl.shapes.prompts import TAGS, all_metadata, article, read_jsonl, split_metadata, write_jsonl


def test_templates_and_metadata():
    md = {m["prompt"]: m for m in all_metadata()}
    assert md["a photo of an orange star"]["include"] == [{"class": "star", "count": 1, "color": "orange"}]
    c = md["a photo of three circles"]
    assert c["tag"] == "counting" and c["include"] == [{"class": "circle", "count": 3}]
    assert c["exclude"] == [{"class": "circle", "count": 4}]
    p = md["a photo of a triangle left of a square"]
    assert p["include"] == [{"class": "square", "count": 1}, {"class": "triangle", "count": 1, "position": ["left of", 0]}]
    assert {m["tag"] for m in md.values()} == set(TAGS)
    assert article("orange") == "an" and article("red") == "a"


def test_split_is_disjoint_deterministic_and_covers_every_tag():
    train, test = split_metadata()
    train2, test2 = split_metadata()
    assert train == train2 and test == test2
    assert not {m["prompt"] for m in train} & {m["prompt"] for m in test}
    assert {m["tag"] for m in test} == set(TAGS)
    assert len(train) + len(test) == len(all_metadata())


def test_committed_prompt_files_match_the_generator():
    train, test = split_metadata()
    assert read_jsonl("assets/prompts/shapes_train.jsonl") == train
    assert read_jsonl("assets/prompts/shapes_test.jsonl") == test


def test_malformed_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a photo of a star", "tag": "single_object", "include": []}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"prompt": "a photo of a star"}) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        read_jsonl(bad)
    ok = tmp_path / "ok.jsonl"
    write_jsonl(all_metadata()[:3], ok)
    assert read_jsonl(ok) == all_metadata()[:3]
