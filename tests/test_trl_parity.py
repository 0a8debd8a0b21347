"""Loss on identical inputs, flowrl vs TRL's ``GRPOTrainer`` (scripts/benchmark_trl.py, part (a)): on a tiny random
Qwen2-VL, one batch of sampled completions with perturbed old log-probs and given advantages is scored by TRL's
``_compute_loss`` and by flowrl's ``VLMPolicy.token_log_probs`` + core loss + ``aggregate_loss``; every matching
loss type agrees to float32 precision in value and gradient, with and without gradient accumulation.

Skipped when TRL is not installed (it is an optional extra, not a dependency of flowrl)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

try:  # an optional extra: absent, or installed but incompatible with this transformers/accelerate
    import trl  # noqa: F401
except ImportError as e:
    pytest.skip(f"TRL is not importable ({e}); install the optional extra: `pip install datasets` then "
                "`pip install --no-deps trl`", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def _script():
    spec = importlib.util.spec_from_file_location("flowrl_benchmark_trl", ROOT / "scripts" / "benchmark_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    from flowrl.text.tiny_qwen2vl import build_tiny_qwen2vl
    from flowrl.text.vqa import make_vqa

    tmp = tmp_path_factory.mktemp("trl_parity")
    build_tiny_qwen2vl(tmp / "model", seed=0)
    records = make_vqa(2, seed=0, split="train")
    # temperature != 1 so that both sides' temperature scaling is exercised
    return _script().loss_parity(tmp / "model", records, group_size=4, max_new_tokens=12, temperature=0.7, seed=0,
                                 work_dir=tmp / "work")


def test_same_prompt_tokens_and_log_probs(parity):
    assert parity["prompt_tokens_identical"], "TRL's chat-template tokenisation differs from VLMPolicy.prompt_inputs"
    assert parity["pixel_values_identical"]
    lp = parity["log_probs"]
    assert lp["max_abs_diff_trl_vs_flowrl_unsuppressed"] < 1e-5
    # flowrl as shipped removes the vision special tokens from the softmax, TRL scores the full vocabulary: with
    # random weights those tokens carry visible probability, so the two log-probs differ by -log(1 - p_vision)
    assert lp["max_abs_diff_trl_vs_flowrl_shipped"] > 1e-4


def test_matching_loss_types_agree(parity):
    rows = {r["name"]: r for r in parity["rows"]}
    assert {"grpo", "bnpo", "dapo", "dr_grpo", "luspo"} <= {r["trl"]["loss_type"] for r in parity["rows"]}
    for name, r in rows.items():
        if not r["expect_match"]:
            continue
        assert r["scaled_diff"] < 1e-6, (name, r["trl_loss"], r["flowrl_loss"])
        assert r["rel_diff"] < 1e-4, (name, r["trl_loss"], r["flowrl_loss"])
        assert r["grad_rel_diff"] < 1e-4, (name, r["grad_rel_diff"])
        acc = r["accumulated"]
        if acc["expect_match"]:
            assert acc["scaled_diff"] < 1e-6, (name, acc)


def test_known_mismatches_are_real(parity):
    """The rows documented as different are different (if they ever agree, the report must be updated)."""
    rows = {r["name"]: r for r in parity["rows"]}
    kl_default = next(r for n, r in rows.items() if not r["expect_match"])
    assert kl_default["scaled_diff"] > 1e-6 and kl_default["grad_rel_diff"] > 1e-4
    bnpo = rows["bnpo"]
    if len(set(bnpo["accumulated"]["tokens"])) > 1:  # unequal micro-batches: local vs global token normaliser
        assert bnpo["accumulated"]["scaled_diff"] > 1e-6
