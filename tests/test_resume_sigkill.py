"""A run killed with SIGKILL mid-training resumes (`trainer.resume=auto`) to exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _cmd(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train_flowgrpo.py"), f"model.pretrained={model}",
            "trainer.epochs=4", "trainer.group_size=4", "trainer.groups_per_epoch=2", "trainer.micro_batch=4",
            "trainer.optimizer_steps_per_epoch=1", "trainer.eval_base=false", "trainer.eval_max_prompts=1",
            "trainer.eval_images_per_prompt=1", "trainer.eval_batch=4", "trainer.save_every=1",
            "trainer.log_images_every=0", "trainer.threads=1", "sampler.train_steps=4", "sampler.eval_steps=4",
            f"trainer.output_dir={out}", *extra]


def test_sigkill_then_resume_matches_uninterrupted(tiny_sd3_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(_cmd(tiny_sd3_path, tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_sd3_path, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        t0 = time.time()
        while not (out / "checkpoints" / "epoch_0002" / "trainer_state.pt").is_file():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < 600
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: epoch 3 (index 2) is under way
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "checkpoints" / "final").exists()
    res = subprocess.run(_cmd(tiny_sd3_path, out, "trainer.resume=auto"), capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    a = torch.load(tmp_path / "ref" / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
    b = torch.load(out / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    for p, q in zip(a["ema"], b["ema"]):
        assert torch.equal(p, q)
    assert [h["reward/mean"] for h in a["history"]] == [h["reward/mean"] for h in b["history"]]
