"""scripts/verified_matrix.py (issue 4 §6): the dry run lists the (update rule × sampler) pairs and the refused
combinations; one real pair on the tiny random SD3 pipeline writes its markdown row and JSON (shared base
evaluation, scores, wall time, peak memory); failures are recorded with their last error line and make the exit
status non-zero."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "verified_matrix.py"
# the smallest budget: 1 epoch of 2 prompts × 2 images, 2 held-out prompts × 1 image, 2 sampling steps
SMALL = ["--epochs", "1", "--groups", "2", "--group-size", "2", "--eval-prompts", "2", "--eval-images", "1",
         "--train-steps", "2", "--eval-steps", "2", "--threads", "1"]


def _module():
    spec = importlib.util.spec_from_file_location("flowrl_verified_matrix", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_dry_run_lists_pairs_and_refusals(tmp_path):
    p = _run("--dry-run", "--out", str(tmp_path / "m"), "--md", str(tmp_path / "matrix.md"))
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "matrix.md").exists()  # a dry run trains nothing and leaves the table alone
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    rows = {(r["rule"], r["sampler"]): r for r in plan["rows"]}
    rules = ["flow_grpo", "flow_grpo_dual_clip", "flow_grpo_reinforce", "flow_grpo_grpo_guard", "flow_grpo_gspo",
             "flow_grpo_gmpo", "flow_grpo_global_std", "nft", "raft", "flow_dpo", "draft"]
    assert sorted({r for r, _ in rows}) == sorted(rules) and len(rows) == 11 * 5
    planned = {k for k, r in rows.items() if r["status"] == "planned"}
    assert len(planned) == 36 and plan["counts"] == {"ok": 0, "failed": 0, "refused": 19, "planned": 36}
    # nft runs on ODE rollouts only (a matrix rule: validate accepts nft with an SDE sampler)
    assert rows["nft", "cps"]["status"] == "refused" and rows["nft", "cps"]["refused_by"] == "matrix"
    assert ("nft", "ode") in planned and ("raft", "ode") in planned and ("flow_dpo", "ode") in planned and ("flow_dpo", "cps") in planned
    # a likelihood-ratio update on ODE rollouts is refused by flowrl.config.validate (its first reason recorded)
    for rule in rules[:7]:
        r = rows[rule, "ode"]
        assert r["status"] == "refused" and r["refused_by"] == "validate"
        assert r["reason"].startswith("sampler.noise_level must be > 0")
        assert all((rule, s) in planned for s in ("cps", "sde", "dance", "sde_fast"))
    assert "algorithm.loss_aggregation=seq_mean_step_mean" in rows["flow_grpo_gspo", "sde"]["overrides"]
    assert "algorithm.policy_loss=gmpo" in rows["flow_grpo_gmpo", "cps"]["overrides"]
    assert "| nft | cps | refused: matrix: algorithm=nft is run on ODE rollouts only" in p.stdout
    # DRaFT: ODE only (matrix rule), trained on the differentiable embedded-CLIP reward, scored by the benchmark
    assert rows["draft", "cps"]["refused_by"] == "matrix"
    assert ("draft", "ode") in planned and "reward=clip_shapes" in rows["draft", "ode"]["overrides"]
    assert "| flow_grpo | ode | refused: sampler.noise_level must be > 0" in p.stdout
    assert "36 pairs to run, 19 refused" in p.stdout

    mod = _module()  # --pairs filters (patterns), and budget-dependent refusals
    assert mod.main(["--dry-run", "--out", str(tmp_path / "f"), "--pairs", "flow_grpo:cps,nft:*", *SMALL]) == 0
    sel = json.loads((tmp_path / "f" / "plan.json").read_text())["rows"]
    assert [(r["rule"], r["sampler"], r["status"]) for r in sel] == (
        [("flow_grpo", "cps", "planned")] + [("nft", s, "refused") for s in ("cps", "sde", "dance", "sde_fast")]
        + [("nft", "ode", "planned")])
    mod.main(["--dry-run", "--out", str(tmp_path / "g"), "--pairs", "flow_grpo:sde_fast", *SMALL])
    (r,) = json.loads((tmp_path / "g" / "plan.json").read_text())["rows"]
    assert r["status"] == "refused" and "SDE window" in r["reason"]  # 2 sampling steps leave no room for it
    with pytest.raises(SystemExit) as e:
        mod.main(["--dry-run", "--pairs", "flow_grpo:nope"])
    assert e.value.code == 2


def test_one_pair_on_tiny_pipeline(tiny_sd3_path, tmp_path):
    out, md = tmp_path / "m", tmp_path / "matrix.md"
    p = _run("--model", tiny_sd3_path, "--pairs", "flow_grpo:cps", "--out", str(out), "--md", str(md), *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    num = r"(\d+\.\d+)"
    row = re.search(rf"^\| flow_grpo \| cps \| ok \| {num} \| {num} \| ([+-]\d+\.\d+) \| {num} \| {num} \| (\d+) \| "
                    r"algorithm=flow_grpo algorithm.policy_loss=ppo_clip sampler=cps \|$", md.read_text(), re.M)
    assert row, md.read_text()
    before, after, delta, wall, train, peak = (float(x) for x in row.groups())
    assert 0 <= before <= 1 and 0 <= after <= 1 and delta == pytest.approx(after - before, abs=2e-3)
    assert wall > train >= 0 and peak > 50
    data = json.loads((out / "matrix.json").read_text())
    assert data["counts"]["ok"] == 1 and len(data["rows"]) == 1 and len(data["base_evals"]) == 1
    r, be = data["rows"][0], data["base_evals"][0]
    run = Path(r["run_dir"])
    assert run == out / "flow_grpo__cps" and r["returncode"] == 0
    # the base was evaluated once (trainer.eval_base=false in the run) and its summary copied into the run
    assert json.loads((run / "eval" / "base" / "summary.json").read_text()) == be["summary"]
    assert not (run / "eval" / "base" / "images").exists() and (run / "eval" / "trained" / "summary.json").is_file()
    assert "trainer.eval_base=false" in (run / "matrix_command.txt").read_text()
    assert "accelerate.commands.launch" in (run / "matrix_command.txt").read_text()
    assert r["before"] == be["summary"]["overall"]


def test_failures_are_recorded_and_the_matrix_continues(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "evaluate_base", lambda key, ov, out, timeout: {
        "key": key, "dir": str(out), "summary": None, "wall_s": 0.0, "peak_rss_mib": None, "error": "boom | bad"})
    md = tmp_path / "matrix.md"
    rc = mod.main(["--pairs", "flow_grpo:cps,flow_grpo:sde,flow_grpo:ode", "--out", str(tmp_path / "m"), "--md", str(md),
                   *SMALL])
    assert rc == 1
    rows = json.loads((tmp_path / "m" / "matrix.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["failed", "failed", "refused"]
    assert rows[1]["reason"] == "base evaluation: boom | bad"
    assert "| flow_grpo | sde | failed: base evaluation: boom \\| bad |" in md.read_text()

    # a failing child: its own last error line, not accelerate's CalledProcessError; a timeout stops it
    m = mod.run_measured([sys.executable, "-c", "import sys; print('step 1', file=sys.stderr); "
                          "raise RuntimeError('reward failed')"], tmp_path / "o", tmp_path / "e", dict(os.environ))
    assert m.returncode == 1 and not m.timed_out and m.peak_rss_mib > 0
    assert mod._failure(m, tmp_path / "e") == "RuntimeError: reward failed"
    m = mod.run_measured([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "o", tmp_path / "e",
                         dict(os.environ), timeout=0.5)
    assert m.timed_out and m.wall_s < 30 and mod._failure(m, tmp_path / "e").startswith("timeout after")
    launcher = ("bar 50%|#####     | 1/2\rbar 100%|##########| 2/2\nerror: Invalid learning rate: -1.0\n"
                "Traceback (most recent call last):\n  File \"launch.py\", line 999, in simple_launcher\n"
                "subprocess.CalledProcessError: Command '['python', 'x.py']' returned non-zero exit status 2.\n")
    assert mod.last_error_line(launcher, 1) == "error: Invalid learning rate: -1.0"
    assert "CalledProcessError" in mod.last_error_line(launcher.split("error:")[0] + launcher.split("-1.0\n")[1], 1)
    assert mod.first_reason("invalid configuration:\n  - a is wrong\n  - b too") == "a is wrong (+1 more)"
