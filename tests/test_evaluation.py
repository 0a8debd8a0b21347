"""The evaluation script on a tiny random SD3: files written, GenEval folder layout, last line = overall score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowrl.evaluation import markdown_table, save_grid, summarize

ROOT = Path(__file__).resolve().parent.parent


def test_evaluate_script(tiny_sd3_path, tmp_path):
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", tiny_sd3_path,
                        "--images-per-prompt", "2", "--steps", "3", "--max-prompts", "3", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert last == f"overall: {summary['overall']:.4f}"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {"prompt", "tag", "reward", "strict", "image_index"} <= set(json.loads(lines[0]))
    assert (out / "images" / "00002" / "samples" / "0001.png").is_file()
    assert json.loads((out / "images" / "00000" / "metadata.jsonl").read_text())["tag"] == "single_object"
    assert (out / "grid.png").is_file() and "| single_object |" in (out / "summary.md").read_text()


def test_evaluate_script_bad_inputs(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "model_index.json" in p.stderr


def test_summaries_and_grid(tmp_path):
    recs = [{"prompt": "a", "tag": "colors", "strict": 1.0, "reward": 1.0},
            {"prompt": "a", "tag": "colors", "strict": 0.0, "reward": 0.5},
            {"prompt": "b", "tag": "counting", "strict": 0.0, "reward": 0.0}]
    s = summarize(recs)
    assert s["tasks"] == {"colors": 0.5, "counting": 0.0} and s["overall"] == 0.25
    assert s["correct_prompts"] == 0.5 and abs(s["partial"] - 0.5) < 1e-9
    assert "| colors | 0.500 | 0.500 |" in markdown_table({"x": s, "y": s})
    ocr = [{"prompt": "x", "tag": "ocr", "prompt_index": 0, "image_index": 0, "reward": 1.0, "exact": 1.0},
           {"prompt": "x", "tag": "ocr", "prompt_index": 0, "image_index": 1, "reward": 0.5, "exact": 0.0},
           {"prompt": "y", "tag": "ocr_new_word", "prompt_index": 1, "image_index": 0, "reward": 0.0, "exact": 0.0}]
    s = summarize(ocr)  # a non-GenEval reward: overall = mean reward, per-tag means, no index columns
    assert s["overall"] == s["reward"] == 0.5 and s["exact"] == 1 / 3 and "prompt_index" not in s
    assert s["by_tag"] == {"ocr": {"reward": 0.75, "exact": 0.5}, "ocr_new_word": {"reward": 0.0, "exact": 0.0}}
    assert "| exact · ocr_new_word | 0.0000 |" in markdown_table({"x": s})
    assert "by_tag" not in summarize(ocr[:2])
    path = save_grid(np.zeros((5, 8, 8, 3), np.uint8), tmp_path / "g.png", ncol=2, scale=1)
    from PIL import Image

    assert Image.open(path).size == (2 * 10, 3 * 10)


def test_group_diversity_is_zero_for_identical_groups_and_rms_otherwise():
    from flowrl.evaluation import group_diversity

    a = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    assert group_diversity(a, [0, 0, 1, 1]) == 0.0  # collapsed groups
    b = a.copy()
    b[1] = 255  # group 0: one black and one white image -> RMS difference 1; group 1 identical -> 0
    assert group_diversity(b, [0, 0, 1, 1]) == pytest.approx(0.5)
    c = a.copy()
    c[1, 0, 0] = 255  # 1 of 4 pixels differs fully -> RMS sqrt(1/4)
    assert group_diversity(c, [0, 0, 2, 3]) == pytest.approx(0.5)  # singleton groups are skipped
    assert group_diversity(a[:1], [0]) == 0.0
