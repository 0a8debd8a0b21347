"""Benchmark evaluation: prompt-file kinds (GenEval / OCR / plain), several rewards, base vs LoRA side by side.

The script's ``main`` runs in-process on the tiny random SD3 with cheap rewards (``jpeg_compressibility``,
``geneval_shapes`` and a throwaway text-dependent reward registered by monkeypatching the registry).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.evaluation import RewardSet, benchmark_summary, parse_reward_specs
from flowrl.prompt_sets import load_prompt_set, quoted_text

ROOT = Path(__file__).resolve().parent.parent
GENEVAL = ROOT / "assets" / "prompts" / "shapes_test.jsonl"
FAST = ["--steps", "2", "--images-per-prompt", "2", "--batch", "8"]


def _script():
    spec = importlib.util.spec_from_file_location("flowrl_evaluate_script", ROOT / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        _script().main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


class QuotedLength:
    """Test reward: the length of the OCR target text (``metadata["text"]``), or of the prompt when absent."""

    name = "quoted_length"

    def __call__(self, images, prompts, metadata):
        n = [float(len(m.get("text", p))) for p, m in zip(prompts, metadata)]
        return {"reward": np.array(n, np.float32), "has_text": np.array([float("text" in m) for m in metadata])}


@pytest.fixture
def text_reward(monkeypatch):
    import flowrl.rewards

    mod = types.ModuleType("flowrl_test_text_reward")
    mod.QuotedLength = QuotedLength
    monkeypatch.setitem(sys.modules, "flowrl_test_text_reward", mod)
    monkeypatch.setitem(flowrl.rewards.BUILTIN_REWARDS, "quoted_length", "flowrl_test_text_reward:QuotedLength")
    return "quoted_length"


# -- prompt files --------------------------------------------------------------------------------------------------
def test_kind_detection_for_every_format(tmp_path):
    g = tmp_path / "geneval.jsonl"
    g.write_text("".join(GENEVAL.read_text().splitlines(keepends=True)[:5]))
    ps = load_prompt_set(g)
    assert ps.kind == "geneval" and ps.group_key == "tag" and len(ps) == 5
    assert ps.records[0] == json.loads(GENEVAL.read_text().splitlines()[0])  # metadata passed through unchanged

    (tmp_path / "ocr.txt").write_text('A sign that says "HELLO"\n\nA mug with \u201cGood Morning\u201d printed on it\n'
                                      'New York skyline with "Hello World" and "more" written in fireworks\n')
    ps = load_prompt_set(tmp_path / "ocr.txt")
    assert ps.kind == "ocr" and ps.lines == [1, 3, 4] and ps.group_key is None
    assert [r["text"] for r in ps.records] == ["HELLO", "Good Morning", "Hello World"]  # the first quoted span
    (tmp_path / "ocr.jsonl").write_text(json.dumps({"prompt": 'a neon sign reading "OPEN 24H"', "id": 7}) + "\n")
    ps = load_prompt_set(tmp_path / "ocr.jsonl")
    assert ps.kind == "ocr"
    assert ps.records == [{"prompt": 'a neon sign reading "OPEN 24H"', "id": 7, "text": "OPEN 24H"}]

    (tmp_path / "draw.txt").write_text("A red colored car.\n  Two cats on a bench.  \n")
    ps = load_prompt_set(tmp_path / "draw.txt")
    assert ps.kind == "plain" and [r["prompt"] for r in ps.records] == ["A red colored car.", "Two cats on a bench."]
    csv_text = ('Prompts,Category\nA red colored car.,Colors\n"A sign that says ""Deep Learning"".",Text\n'
                '"A cat, a dog and a bird.",\n')
    (tmp_path / "draw.csv").write_text(csv_text)
    ps = load_prompt_set(tmp_path / "draw.csv")
    assert ps.kind == "plain" and "1 of 3 prompts have quoted text" in ps.reason and ps.group_key == "category"
    assert ps.records == [{"prompt": "A red colored car.", "category": "Colors"},
                          {"prompt": 'A sign that says "Deep Learning".', "category": "Text"},
                          {"prompt": "A cat, a dog and a bird.", "category": "uncategorized"}]
    with pytest.raises(ValueError, match=r"draw\.csv:2: OCR prompt has no target text"):
        load_prompt_set(tmp_path / "draw.csv", kind="ocr")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "category": "animals"}\n"a dog"\n')
    ps = load_prompt_set(tmp_path / "p.jsonl")
    assert ps.kind == "plain" and [r.get("category") for r in ps.records] == ["animals", "uncategorized"]
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"Prompt": "a dog"}]))
    assert [r["prompt"] for r in load_prompt_set(tmp_path / "p.json").records] == ["a cat", "a dog"]
    ps = load_prompt_set(g, kind="plain")  # GenEval tasks become categories
    assert ps.kind == "plain" and ps.group_key == "category" and ps.records[0]["category"] == "single_object"
    assert quoted_text('no quotes') is None and quoted_text('empty ""') is None and quoted_text('x " y " z') == "y"


def test_prompt_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompt_set(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_set(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_prompt_set(tmp_path / "bad.jsonl")
    (tmp_path / "noprompt.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"noprompt\.jsonl:2: no prompt field"):
        load_prompt_set(tmp_path / "noprompt.jsonl")
    (tmp_path / "nocol.csv").write_text("text,category\na,b\n")
    with pytest.raises(ValueError, match=r"nocol\.csv:1: .*no prompt column"):
        load_prompt_set(tmp_path / "nocol.csv")
    lines = GENEVAL.read_text().splitlines()[:2]
    (tmp_path / "g.jsonl").write_text(lines[0] + "\n" + json.dumps({"prompt": "a photo of a cat", "tag": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:2: .*lacks \['include'\]"):
        load_prompt_set(tmp_path / "g.jsonl")
    (tmp_path / "plain.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"plain\.txt:1: "):
        load_prompt_set(tmp_path / "plain.txt", kind="geneval")


def test_reward_specs_and_reward_set():
    specs = parse_reward_specs(["jpeg_compressibility,geneval_shapes",
                                'jpeg_compressibility={"quality": 50, "note": "a,b}", "x": [1, 2]}'])
    assert specs == [("jpeg_compressibility", "jpeg_compressibility", {}), ("geneval_shapes", "geneval_shapes", {}),
                     ("jpeg_compressibility_2", "jpeg_compressibility", {"quality": 50, "note": "a,b}", "x": [1, 2]})]
    for bad, msg in (("clip_score={model: x}", "not valid JSON"), ("clip_score=[1]", "JSON object"),
                     ("bad name", "NAME"), (" , ", "no reward")):
        with pytest.raises(ValueError, match=msg):
            parse_reward_specs([bad])
    one = RewardSet({"q": QuotedLength()})
    assert one.columns == {"q": "reward"}
    assert set(one(np.zeros((1, 4, 4, 3), np.uint8), ["ab"], [{}])) == {"reward", "has_text"}
    two = RewardSet({"q": QuotedLength(), "q2": QuotedLength()})
    out = two(np.zeros((2, 4, 4, 3), np.uint8), ["ab", "abc"], [{}, {"text": "x"}])
    assert two.columns == {"q": "q", "q2": "q2"} and list(out["reward"]) == [2.0, 1.0] == list(out["q2"])
    assert "q/has_text" in out and "has_text" not in out  # an extra column both rewards have stays namespaced
    recs = [{"prompt": "a", "prompt_index": 0, "image_index": 0, "category": "x", "reward": 1.0},
            {"prompt": "b", "prompt_index": 1, "image_index": 0, "category": "y", "reward": 3.0}]
    s = benchmark_summary(recs, kind="plain", reward_columns={"q": "reward"}, group_key="category")
    assert s["rewards"] == {"q": 2.0} and s["groups"]["y"]["reward"] == 3.0 and s["n_prompts"] == 2


# -- the script ----------------------------------------------------------------------------------------------------
def _recs(values: dict[int, list[float]], tags: dict[int, str] | None = None) -> list[dict]:
    return [{"prompt": f"p{i}", "prompt_index": i, "image_index": k, "tag": (tags or {}).get(i, ""), "reward": v}
            for i, vs in values.items() for k, v in enumerate(vs)]


def test_paired_difference_is_per_prompt_with_its_standard_error():
    from flowrl.eval_report import paired_difference, render_paired_markdown

    tags = {0: "a", 1: "a", 2: "b", 3: "b"}
    base = _recs({0: [0.0, 0.2], 1: [0.5, 0.5], 2: [1.0, 0.0], 3: [0.3, 0.1]}, tags)
    model = _recs({0: [0.4, 0.2], 1: [0.5, 0.7], 2: [1.0, 0.4], 3: [0.1, 0.1]}, tags)
    # per-prompt differences: 0.2, 0.1, 0.2, -0.1 -> mean 0.1, sample sd sqrt(0.06 / 3), se = sd / 2
    r = paired_difference(base, model, "reward", group_key="tag")
    assert r["n_prompts"] == 4 and r["mean"] == pytest.approx(0.1)
    assert r["se"] == pytest.approx(np.sqrt(0.06 / 3) / 2) and r["z"] == pytest.approx(0.1 / r["se"])
    assert r["base"] == pytest.approx(np.mean([0.1, 0.5, 0.5, 0.2])) and r["model"] - r["base"] == pytest.approx(0.1)
    assert set(r["groups"]) == {"a", "b"}
    assert r["groups"]["a"]["mean"] == pytest.approx(0.15) and r["groups"]["a"]["se"] == pytest.approx(0.05)
    assert r["groups"]["b"]["mean"] == pytest.approx(0.05) and r["groups"]["b"]["n_prompts"] == 2
    # pairing removes the prompt-to-prompt spread: the same shift on very different prompts has zero error
    flat = paired_difference(_recs({0: [0.0], 1: [0.9]}), _recs({0: [0.1], 1: [1.0]}), "reward")
    assert flat["mean"] == pytest.approx(0.1) and flat["se"] == pytest.approx(0.0, abs=1e-12)
    assert flat["groups"] == {}
    one = paired_difference(_recs({0: [0.0]}), _recs({0: [0.5], 1: [0.5]}), "reward")  # only prompt 0 is shared
    assert one["n_prompts"] == 1 and one["mean"] == 0.5 and np.isnan(one["se"])
    md = render_paired_markdown({"trained": r}, "base")
    assert "| trained | 4 | 0.3250 | 0.4250 | +0.1000 ± 0.0707 | +1.4 |" in md and "| trained · b | 2 |" in md
    with pytest.raises(ValueError, match="no prompt has column 'strict' in both"):
        paired_difference(base, model, "strict")


def test_script_errors_are_clear(tmp_path, tiny_sd3_path, capsys):
    base = ["--model", tiny_sd3_path, *FAST]
    code, _, err = _run([*base, "--prompts", tmp_path / "nope.jsonl"], capsys)
    assert code == 2 and "prompt file not found" in err and "nope.jsonl" in err
    (tmp_path / "bad.jsonl").write_text(GENEVAL.read_text().splitlines()[0] + "\nnot json\n")
    code, _, err = _run([*base, "--prompts", tmp_path / "bad.jsonl"], capsys)
    assert code == 2 and "bad.jsonl:2: not valid JSON" in err
    (tmp_path / "empty.txt").write_text("")
    code, _, err = _run([*base, "--prompts", tmp_path / "empty.txt"], capsys)
    assert code == 2 and "no prompts" in err
    code, _, err = _run([*base, "--lora", tmp_path / "no_such_lora"], capsys)
    assert code == 2 and f"LoRA folder {tmp_path / 'no_such_lora'} not found" in err
    (tmp_path / "not_a_lora").mkdir()
    code, _, err = _run([*base, "--checkpoint", f"x={tmp_path / 'not_a_lora'}"], capsys)
    assert code == 2 and "holds no LoRA weights" in err
    code, _, err = _run([*base, "--reward", "jpeg_compressibility,no_such_reward"], capsys)
    assert code == 2 and "unknown reward 'no_such_reward'; registered rewards:" in err and "jpeg_compressibility" in err
    (tmp_path / "p.txt").write_text("a red car\n")
    code, _, err = _run([*base, "--prompts", tmp_path / "p.txt"], capsys)
    assert code == 2 and "plain prompt file" in err and "--reward" in err
    code, _, err = _run([*base, "--prompts", tmp_path / "p.txt", "--reward", "geneval_shapes"], capsys)
    assert code == 2 and "reward 'geneval_shapes' cannot score plain prompts" in err
    code, _, err = _run([*base, "--no-base"], capsys)
    assert code == 2 and "nothing to evaluate" in err


def _save_lora(model_path: str, folder: Path) -> Path:
    from flowrl.models.sd3 import SD3Adapter

    ad = SD3Adapter.from_pretrained(model_path, max_sequence_length=0, load_t5=False)
    params = ad.add_lora(4, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ad.save_lora(folder)
    return folder


def test_base_and_lora_side_by_side_with_identical_seeds(tiny_sd3_path, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "final"
    _save_lora(tiny_sd3_path, ckpt / "lora_ema")
    common = ["--model", tiny_sd3_path, *FAST, "--max-prompts", "3", "--reward", "geneval_shapes",
              "--reward", "jpeg_compressibility"]
    cmp_dir, base_dir = tmp_path / "cmp", tmp_path / "base_only"
    code, out, err = _run([*common, "--checkpoint", f"trained={ckpt}", "--out", cmp_dir], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-2:] == [
        f"overall[{m}]: {json.loads((cmp_dir / m / 'summary.json').read_text())['overall']:.4f}"
        for m in ("base", "trained")]
    md = (cmp_dir / "comparison.md").read_text()
    assert "|  | base | trained | Δ trained |" in md and "| single_object |" in md and "jpeg_compressibility" in md
    data = json.loads((cmp_dir / "comparison.json").read_text())
    assert list(data["models"]) == ["base", "trained"] and data["base"] == "base"
    summ = {m: data["models"][m]["summary"] for m in data["models"]}
    assert set(summ["base"]["rewards"]) == {"geneval_shapes", "jpeg_compressibility"}
    row = next(r for t in data["tables"] for r in t["rows"] if r["name"] == "jpeg_compressibility (mean reward)")
    assert row["delta_vs_base"]["trained"] == pytest.approx(row["values"]["trained"] - row["values"]["base"])
    assert summ["trained"]["columns"] != summ["base"]["columns"]  # the LoRA was applied
    paired = data["paired"]["trained"]  # the first reward, paired by prompt: its mean is the table's Δ
    assert paired["column"] == data["models"]["base"]["summary"]["reward_columns"]["geneval_shapes"]
    primary = next(r for t in data["tables"] for r in t["rows"] if r["name"] == "geneval_shapes (mean reward)")
    assert paired["mean"] == pytest.approx(primary["delta_vs_base"]["trained"]) and paired["n_prompts"] == 3
    assert "### Paired difference of geneval_shapes vs base" in md and "| trained | 3 |" in md
    html = (cmp_dir / "report.html").read_text()
    for src in ("base/grid.png", "trained/grid.png", "base/images/00000/samples/0000.png",
                "trained/images/00002/samples/0000.png"):
        assert f"src='{src}'" in html and (cmp_dir / src).is_file()

    code, out, err = _run([*common, "--out", base_dir], capsys)  # the base model alone: the classic layout
    assert code == 0, err
    alone = json.loads((base_dir / "summary.json").read_text())
    assert out.strip().splitlines()[-1] == f"overall: {alone['overall']:.4f}"
    assert alone["benchmark"] == summ["base"]  # same prompts, same seeds, same numbers
    assert (base_dir / "results.jsonl").read_text() == (cmp_dir / "base" / "results.jsonl").read_text()
    assert (base_dir / "images" / "00001" / "samples" / "0001.png").read_bytes() == \
        (cmp_dir / "base" / "images" / "00001" / "samples" / "0001.png").read_bytes()
    assert (base_dir / "report.html").is_file() and not (base_dir / "comparison.md").exists()

    code, _, err = _run([*common, "--no-base", "--lora", ckpt / "lora_ema", "--out", tmp_path / "lora_only"], capsys)
    assert code == 0, err  # the LoRA alone, after no base run, gives the same column (seeds do not depend on order)
    assert json.loads((tmp_path / "lora_only" / "summary.json").read_text())["benchmark"] == summ["trained"]


def test_ocr_and_plain_files_with_several_rewards(tiny_sd3_path, tmp_path, capsys, text_reward):
    (tmp_path / "ocr.txt").write_text('A sign that says "HELLO"\nA poster with "flow matching" in bold\n')
    code, out, err = _run(["--model", tiny_sd3_path, *FAST, "--prompts", tmp_path / "ocr.txt", "--reward",
                           text_reward, "--out", tmp_path / "ocr"], capsys)
    assert code == 0, err
    assert "kind ocr" in out and out.strip().splitlines()[-1] == "reward: 9.0000"  # len "HELLO", "flow matching"
    recs = [json.loads(x) for x in (tmp_path / "ocr" / "results.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in recs] == [5.0, 5.0, 13.0, 13.0] and all(r["has_text"] == 1.0 for r in recs)
    md = json.loads((tmp_path / "ocr" / "images" / "00001" / "metadata.jsonl").read_text())
    assert md["text"] == "flow matching"

    (tmp_path / "draw.csv").write_text("Prompts,Category\nA red car.,Colors\nTwo cats.,Counting\nA blue car.,Colors\n")
    code, out, err = _run(["--model", tiny_sd3_path, *FAST, "--prompts", tmp_path / "draw.csv", "--reward",
                           f"{text_reward},jpeg_compressibility", "--out", tmp_path / "draw"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "draw" / "summary.json").read_text())["benchmark"]
    assert s["kind"] == "plain" and list(s["groups"]) == ["Colors", "Counting"]
    assert s["rewards"][text_reward] == pytest.approx((10 + 9 + 11) / 3)
    assert s["groups"]["Colors"]["n_prompts"] == 2 and s["groups"]["Colors"][text_reward] == pytest.approx(10.5)
    summary_md = (tmp_path / "draw" / "summary.md").read_text()
    assert "### quoted_length per category" in summary_md and "| Colors (2 prompts) | 10.5000 |" in summary_md
    assert "### jpeg_compressibility per category" in summary_md
