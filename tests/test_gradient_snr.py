"""The gradient signal-to-noise figures of scripts/benchmark_gradient_snr.py on gradients with a known answer."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("benchmark_gradient_snr", ROOT / "scripts" / "benchmark_gradient_snr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_snr_recovers_known_signal_and_noise():
    snr = _module().snr_stats
    g = torch.Generator().manual_seed(0)
    p, k = 4000, 400
    mean = torch.zeros(p, dtype=torch.float64)
    mean[:100] = 0.5  # ‖E g‖² = 25
    noise_std = 0.1  # tr Σ = 4000 · 0.01 = 40 per group → 1.6 groups for SNR 1
    grads = mean + noise_std * torch.randn(k, p, generator=g, dtype=torch.float64)
    s = snr(grads)
    assert s["signal"] == pytest.approx(25.0, rel=0.02)
    assert s["noise_per_group"] == pytest.approx(40.0, rel=0.02)
    assert s["groups_for_snr1"] == pytest.approx(1.6, rel=0.05)
    assert s["split_half_cosine"] > 0.95


def test_pure_noise_has_no_signal():
    snr = _module().snr_stats
    grads = torch.randn(64, 5000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = snr(grads)
    assert s["signal"] < 0.05 * s["noise_per_group"]
    assert abs(s["split_half_cosine"]) < 0.1
    assert s["groups_for_snr1"] > 20


def test_too_few_groups_is_refused():
    with pytest.raises(ValueError, match="at least 4 groups"):
        _module().snr_stats(torch.zeros(3, 10, dtype=torch.float64))
