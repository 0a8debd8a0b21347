"""The FLUX.1 adapter + rollout against diffusers' own ``FluxPipeline``, on a tiny random FLUX saved locally."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from flowrl.flow.rollout import sample_trajectory, step_fn
from flowrl.models.flux import FluxAdapter
from flowrl.models.tiny_flux import T5_MAX_LENGTH

PROMPTS = ["a photo of a red circle", "a photo of two stars", "a photo of a square left of a star"]


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def tiny_flux_path(tmp_path_factory):
    from flowrl.models.tiny_flux import tiny_random_flux_pipeline

    return str(tiny_random_flux_pipeline(tmp_path_factory.mktemp("models") / "tiny_flux", seed=0))


@pytest.fixture(scope="module")
def ad(tiny_flux_path):
    return FluxAdapter.from_pretrained(tiny_flux_path, max_sequence_length=T5_MAX_LENGTH, resolution=64)


def _rollout(adapter, prompts, seeds, steps, height, width, guidance, noise_level=0.0, kind="sde"):
    gens = _gens(seeds)
    x = adapter.initial_noise(gens, height, width)
    cond = adapter.encode(prompts)
    return sample_trajectory(lambda z, s: adapter.velocity(z, s, cond, guidance), x,
                             adapter.sigmas(steps, height, width), torch.full((steps,), noise_level), kind=kind,
                             generators=gens)


@pytest.mark.parametrize("height,width,guidance,true_cfg", [(64, 64, 3.5, 1.0), (64, 32, 2.0, 3.0)])
def test_noise_level_zero_reproduces_the_pipeline(ad, height, width, guidance, true_cfg):
    """Same seeds and steps: latents bit for bit, decoded images within float tolerance (packing, position ids for a
    non-square size, the dynamic shift, the guidance embedding and true CFG all have to agree with the pipeline)."""
    seeds = [3, 4, 5]
    neg = "blurry" if true_cfg > 1 else None
    adapter = FluxAdapter(ad.pipeline, max_sequence_length=T5_MAX_LENGTH, resolution=64, true_cfg_scale=true_cfg,
                          negative_prompt=neg or "")
    kw = dict(num_inference_steps=5, guidance_scale=guidance, height=height, width=width,
              max_sequence_length=T5_MAX_LENGTH, negative_prompt=[neg] * 3 if neg else None, true_cfg_scale=true_cfg)
    ref = ad.pipeline(PROMPTS, generator=_gens(seeds), output_type="latent", **kw).images  # packed [B, tokens, 4C]
    ref_img = ad.pipeline(PROMPTS, generator=_gens(seeds), output_type="pt", **kw).images  # [B, 3, H, W] in [0, 1]
    traj = _rollout(adapter, PROMPTS, seeds, 5, height, width, guidance)
    assert traj.final.shape == (3, *adapter.latent_shape(height, width))
    assert torch.equal(adapter.pack(traj.final), ref.float())
    torch.testing.assert_close(adapter.decode(traj.final), ref_img.float(), rtol=0, atol=1e-5)
    assert not traj.train_mask.any() and torch.equal(traj.log_probs, torch.zeros(3, 5))


def test_sigma_grid_has_the_resolution_dependent_shift(ad):
    """σ_i = e^μ / (e^μ + 1/t_i - 1) on t = linspace(1, 1/N, N), μ linear in the packed image-token count."""
    n = 6
    for side, tokens in ((64, 64), (128, 256)):
        mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
        assert ad.image_tokens(side, side) == tokens and math.isclose(ad.mu(side, side), mu, rel_tol=1e-12)
        t = np.linspace(1.0, 1 / n, n)
        expect = torch.tensor(list(math.exp(mu) / (math.exp(mu) + 1 / t - 1)) + [0.0], dtype=torch.float32)
        torch.testing.assert_close(ad.sigmas(n, side, side), expect, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ad.sigmas(n, 64, 64), ad.sigmas(n, 128, 128))
    assert torch.equal(ad.sigmas(n), ad.sigmas(n, 64, 64))  # the adapter's default resolution
    fresh = FluxAdapter(ad.pipeline, max_sequence_length=T5_MAX_LENGTH, resolution=64)
    fresh.sigmas(n)  # grid for 64 × 64 → 64 tokens; sampling 32 × 32 (16 tokens) on it is flagged
    with pytest.warns(UserWarning, match="sigmas"):
        fresh.velocity(torch.zeros(1, 4, 8, 8), torch.ones(1), fresh.encode(PROMPTS[:1]))


def test_stored_step_log_prob_recomputes_exactly(ad):
    cond = ad.encode(PROMPTS)
    sig = ad.sigmas(5, 64, 64)
    for kind, a in (("sde", 0.9), ("cps", 0.8), ("dance", 0.3)):  # every SDE kind: first on-policy ratio exactly 1
        traj = _rollout(ad, PROMPTS, [0, 1, 2], 5, 64, 64, 3.5, noise_level=a, kind=kind)
        assert traj.train_mask[:, :4].all()
        f = step_fn(kind, float(sig[1]))
        for t in range(4):
            v = ad.velocity(traj.latents[:, t], sig[t].expand(3), cond, 3.5)
            out = f(traj.latents[:, t], v, sig[t], sig[t + 1], traj.noise_levels[:, t],
                    prev_sample=traj.latents[:, t + 1])
            assert torch.equal(torch.exp(out.log_prob - traj.log_probs[:, t]), torch.ones(3))


def test_guidance_embedding_conditions_the_velocity(ad):
    cond = ad.encode(PROMPTS[:2])
    x = ad.initial_noise(_gens([0, 1]), 64, 64)
    s = torch.full((2,), 0.7)
    v1, v2 = ad.velocity(x, s, cond, 1.0), ad.velocity(x, s, cond, 5.0)
    assert v1.shape == x.shape and v1.dtype == torch.float32
    assert (v1 - v2).abs().max() > 1e-5


def test_lora_saved_loads_into_the_pipeline(tiny_flux_path, tmp_path):
    adapter = FluxAdapter.from_pretrained(tiny_flux_path, max_sequence_length=T5_MAX_LENGTH, resolution=64)
    params = adapter.add_lora(4, 8)
    assert any("single_transformer_blocks" in n for n, p in adapter.transformer.named_parameters() if "lora_" in n)
    cond = adapter.encode(PROMPTS[:1])
    x = adapter.initial_noise(_gens([1]), 64, 64)
    loss = adapter.velocity(x, torch.full((1,), 0.5), cond, 3.5).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            p.grad = None
            p.add_(torch.randn_like(p) * 0.1)
    adapter.save_lora(tmp_path / "lora")

    kw = dict(num_inference_steps=3, guidance_scale=3.5, height=64, width=64, max_sequence_length=T5_MAX_LENGTH,
              output_type="latent")
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    base_pipe = pipe(PROMPTS[:1], generator=_gens([1]), **kw).images
    pipe.load_lora_weights(tmp_path / "lora")
    lora_pipe = pipe(PROMPTS[:1], generator=_gens([1]), **kw).images

    traj = _rollout(adapter, PROMPTS[:1], [1], 3, 64, 64, 3.5)
    torch.testing.assert_close(adapter.pack(traj.final), lora_pipe.float(), rtol=1e-4, atol=1e-5)
    with adapter.reference():
        base = _rollout(adapter, PROMPTS[:1], [1], 3, 64, 64, 3.5)
    torch.testing.assert_close(adapter.pack(base.final), base_pipe.float(), rtol=1e-4, atol=1e-5)
    assert (lora_pipe - base_pipe).abs().max() > 1e-3  # the loaded LoRA changes the pipeline's output


def test_missing_or_wrong_model_path_is_a_clear_error(tmp_path, tiny_flux_path):
    with pytest.raises(FileNotFoundError, match="model_index.json.*FLUX.1-dev"):
        FluxAdapter.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        FluxAdapter.from_pretrained("assets/does-not-exist")
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline.*family=sd3"):
        FluxAdapter.from_pretrained(str(sd3))
    with pytest.raises(ValueError, match="load_t5"):
        FluxAdapter.from_pretrained(tiny_flux_path, load_t5=False)


def test_decode_range_and_latent_shape(ad):
    assert ad.latent_shape(64, 32) == (4, 16, 8)
    img = ad.decode(torch.randn(2, 4, 16, 8))
    assert img.shape == (2, 3, 64, 32) and img.min() >= 0 and img.max() <= 1
    x = torch.randn(2, 4, 16, 8)
    assert torch.equal(ad.unpack(ad.pack(x), 16, 8), x) and ad.pack(x).shape == (2, 32, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        ad.latent_shape(60, 64)


def test_trainer_runs_flow_grpo_on_flux(tiny_flux_path, tmp_path):
    """`model.family=flux` goes through the same trainer: on-policy first ratio exactly 1, the LoRA moves, and the
    held-out evaluation runs (embedded guidance, DanceGRPO's SDE)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from flowrl.config import register_configs
    from flowrl.models.tiny_flux import T5_MAX_LENGTH
    from flowrl.trainer import Trainer

    register_configs()
    cfg_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        cfg = OmegaConf.to_object(compose("train", overrides=[
            "model=flux_dev", f"model.pretrained={tiny_flux_path}", "model.dtype=float32", "model.resolution=64",
            f"model.max_sequence_length={T5_MAX_LENGTH}", "model.gradient_checkpointing=false", "sampler=dance",
            "sampler.guidance_scale=3.5", "sampler.eval_guidance_scale=3.5", "sampler.train_steps=4",
            "sampler.eval_steps=4", "trainer.epochs=1", "trainer.group_size=2", "trainer.groups_per_epoch=2",
            "trainer.micro_batch=4", "trainer.eval_max_prompts=2", "trainer.eval_images_per_prompt=1",
            f"trainer.output_dir={tmp_path / 'run'}", "trainer.save_every=0", "trainer.log_images_every=0"]))
    tr = Trainer(cfg)
    before = [p.detach().clone() for p in tr.params]
    res = tr.run()
    assert res["history"][0]["train/first_ratio_max_dev"] == 0.0
    assert any((a - b).abs().max() > 0 for a, b in zip(tr.params, before))
    assert "overall" in res["trained"]
