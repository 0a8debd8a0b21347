"""Reward plugins: registry/entry points, JPEG rewards, multi-reward combination and GDPO advantages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from flowrl.core.multi_reward import gdpo_advantages, weighted_sum
from flowrl.rewards import MultiReward, load_reward


def _images():
    rng = np.random.default_rng(0)
    flat = np.full((2, 64, 64, 3), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    return np.concatenate([flat, noise])


def test_jpeg_rewards_order_flat_above_noise():
    imgs = _images()
    comp = load_reward("jpeg_compressibility")(imgs, ["p"] * 4, None)
    inc = load_reward("jpeg_incompressibility", scale=1.0)(imgs, ["p"] * 4, None)
    assert comp["jpeg_kb"][0] < comp["jpeg_kb"][2] / 5  # a flat image is far smaller than noise
    assert comp["reward"][0] > comp["reward"][2]
    np.testing.assert_allclose(comp["reward"] * 500, -comp["jpeg_kb"], rtol=1e-6)
    np.testing.assert_allclose(inc["reward"], inc["jpeg_kb"], rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        load_reward("jpeg_compressibility")(imgs.astype(np.float32), ["p"] * 4, None)
    with pytest.raises(ValueError, match="quality"):
        load_reward("jpeg_compressibility", quality=0)


def test_multi_reward_weighted_sum_and_columns():
    imgs = _images()
    md = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}] * 4
    multi = MultiReward({"jpeg_compressibility": 2.0, "geneval_shapes": {"weight": 0.5}})
    out = multi(imgs, ["a photo of a circle"] * 4, md)
    c = load_reward("jpeg_compressibility")(imgs, ["p"] * 4, None)["reward"]
    g = load_reward("geneval_shapes")(imgs, ["p"] * 4, md)
    np.testing.assert_allclose(out["reward"], 2.0 * c + 0.5 * g["reward"], rtol=1e-6)
    np.testing.assert_allclose(out["jpeg_compressibility"], c)
    assert "geneval_shapes/strict" in out and "strict" in out and "jpeg_compressibility/jpeg_kb" in out
    assert multi.weights == {"jpeg_compressibility": 2.0, "geneval_shapes": 0.5}
    with pytest.raises(KeyError, match="nope.*of.*multi"):
        MultiReward({"nope": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):
        MultiReward({"jpeg_compressibility": {"wieght": 1.0}})
    with pytest.raises(ValueError, match="components"):
        MultiReward({})


def _loop_gdpo(comps, weights, g, eps):
    n = len(g)
    tot = [0.0] * n
    for k, r in comps.items():
        for i in range(n):
            grp = [r[j] for j in range(n) if g[j] == g[i]]
            mu = sum(grp) / len(grp)
            sd = (sum((x - mu) ** 2 for x in grp) / len(grp)) ** 0.5
            tot[i] += weights[k] * (r[i] - mu) / (sd + eps)
    mu = sum(tot) / n
    sd = (sum((x - mu) ** 2 for x in tot) / n) ** 0.5
    return [(x - mu) / (sd + eps) for x in tot]


def test_gdpo_matches_loop_and_separates_reward_combinations():
    gen = torch.Generator().manual_seed(1)
    g = torch.arange(12) // 4
    comps = {"a": torch.rand(12, generator=gen), "b": (torch.rand(12, generator=gen) > 0.5).float()}
    w = {"a": 1.0, "b": 0.3}
    got = gdpo_advantages(comps, w, g, "grpo", 1e-4, clip=None)
    ref = torch.tensor(_loop_gdpo({k: v.tolist() for k, v in comps.items()}, w, g.tolist(), 1e-4))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # GDPO's motivating case: with a summed reward, (1,0)+(0,1) groups look alike; per-component scores differ
    r1 = torch.tensor([1., 0, 0, 0, 1, 1, 0, 0])
    r2 = torch.tensor([0., 0, 0, 0, 1, 0, 0, 0])
    gg = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    summed = torch.tensor([1., 0, 0, 0, 2, 1, 0, 0])
    from flowrl.core import compute_advantages

    grpo = compute_advantages(weighted_sum({"x": r1, "y": r2}, {"x": 1, "y": 1}), gg, "grpo", clip=None)
    torch.testing.assert_close(weighted_sum({"x": r1, "y": r2}, {"x": 1, "y": 1}), summed)
    gd = gdpo_advantages({"x": r1, "y": r2}, {"x": 1, "y": 1}, gg, "grpo", clip=None)
    assert abs(float(gd.mean())) < 1e-5 and abs(float(gd.std(unbiased=False)) - 1) < 1e-3
    assert not torch.allclose(gd / gd.std(), grpo / grpo.std())
    with pytest.raises(ValueError, match="one weight per reward component"):
        gdpo_advantages({"x": r1}, {"y": 1.0}, gg)


def test_third_party_plugin_is_found_by_name(tmp_path, monkeypatch):
    """A reward defined in a throwaway package, installed (pip --target) during the test, is loaded by name."""
    pkg = tmp_path / "src"
    (pkg / "my_reward_pkg").mkdir(parents=True)
    (pkg / "my_reward_pkg" / "__init__.py").write_text(textwrap.dedent("""
        import numpy as np
        class Brightness:
            name = "brightness_test"
            def __init__(self, scale=1.0):
                self.scale = scale
            def __call__(self, images, prompts, metadata):
                return {"reward": self.scale * images.reshape(len(images), -1).mean(1) / 255.0}
    """))
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "my-reward-pkg"
        version = "0.1"
        [project.entry-points."flowrl.rewards"]
        brightness_test = "my_reward_pkg:Brightness"
        [tool.setuptools]
        packages = ["my_reward_pkg"]
    """))
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(pkg)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    monkeypatch.syspath_prepend(str(target))
    with pytest.raises(KeyError, match="registered rewards"):
        load_reward("brightness_tset")
    fn = load_reward("brightness_test", scale=2.0)
    out = fn(_images(), ["p"] * 4, None)
    np.testing.assert_allclose(out["reward"][:2], 2.0 * 128 / 255, rtol=1e-6)
