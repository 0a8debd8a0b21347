"""The UNet (SD1.5-style ε-prediction) adapter in the flow-matching frame, against diffusers' own
``StableDiffusionPipeline`` with a ``DDIMScheduler``, on a tiny random pipeline saved locally."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from flowrl.flow.rollout import sample_trajectory, step_fn
from flowrl.flow.samplers import ddim_step
from flowrl.flow.sde import cps_step, randn_like_with
from flowrl.models.unet import (UNetAdapter, alpha_prod_from_sigma, eps_to_velocity, flow_coefficients,
                                model_output_to_eps, velocity_to_eps)

PROMPTS = ["a photo of a red circle", "a photo of two stars", "a photo of a square left of a star"]
RES = 64


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def tiny_unet_path(tmp_path_factory):
    from flowrl.models.tiny_unet import tiny_random_unet_pipeline

    return str(tiny_random_unet_pipeline(tmp_path_factory.mktemp("models") / "tiny_unet", seed=0))


@pytest.fixture(scope="module")
def ad(tiny_unet_path):
    return UNetAdapter.from_pretrained(tiny_unet_path)


@pytest.fixture(scope="module")
def cond(ad):
    return ad.encode(PROMPTS)


def _rollout(adapter, cond, seeds, steps, guidance, levels=None, kind="sde"):
    gens = _gens(seeds)  # the same generators draw the initial noise and then the step noise, as the pipeline does
    x = adapter.initial_noise(gens, RES, RES, num_steps=steps)
    levels = torch.zeros(steps) if levels is None else levels
    return sample_trajectory(lambda z, s: adapter.velocity(z, s, cond, guidance), x, adapter.sigmas(steps),
                             levels.expand(len(seeds), steps), kind=kind, generators=gens)


def _pipeline(pipe, steps, guidance, seeds, eta=0.0, output_type="latent"):
    latents = []

    def keep(_pipe, _i, _t, kw):
        latents.append(kw["latents"].clone())
        return kw

    out = pipe(PROMPTS[: len(seeds)], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
               generator=_gens(seeds), height=RES, width=RES, output_type=output_type,
               callback_on_step_end=keep).images
    return out, latents


# --------------------------------------------------------------------------------------------------------------------
# (a) σ ↔ t
# --------------------------------------------------------------------------------------------------------------------

def test_sigma_to_timestep_round_trips_on_the_scheduler_grid(ad):
    sched = ad.pipeline.scheduler
    ac = sched.alphas_cumprod
    for n in (1, 6, 10, 50):
        sig = ad.sigmas(n)
        sched.set_timesteps(n)
        assert sig.shape == (n + 1,) and sig.dtype == torch.float32 and sig[-1] == 0
        assert bool((sig[1:] < sig[:-1]).all()) and sig[0] < 1
        t, ab = ad.timesteps(sig[:-1])
        assert torch.equal(t.long(), sched.timesteps) and torch.equal(t, t.round())
        assert torch.equal(ab, ac[sched.timesteps].double())  # the scheduler's own ᾱ_t, bit for bit
    # every integer timestep, and σ = 0 ↔ t = 0 in the default (scheduler-terminal) frame
    t, ab = ad.timesteps(ad._sigma_table)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32)) and torch.equal(ab, ac.double())
    assert float(ad._sigma_table[0]) == 0.0 and ad.alpha_prod_final == float(ac[0])
    # closed forms: the clean frame is σ = s/(α+s); the scheduler frame has σ/(1-σ) = α_f·s/α - s_f
    a, s = ac.double().sqrt(), (1 - ac.double()).sqrt()
    sig_clean, k_clean = flow_coefficients(ac, 1.0)
    torch.testing.assert_close(sig_clean, s / (a + s), rtol=0, atol=1e-15)
    torch.testing.assert_close(k_clean, a + s, rtol=0, atol=1e-15)
    af, sf = math.sqrt(float(ac[0])), math.sqrt(1 - float(ac[0]))
    sig_s, _ = flow_coefficients(ac, float(ac[0]))
    torch.testing.assert_close(sig_s / (1 - sig_s), af * s / a - sf, rtol=1e-12, atol=1e-12)
    # off the grid: ᾱ follows σ exactly and t is interpolated between the neighbouring integers
    mid = torch.tensor([0.3, 0.5, 0.9])
    t, ab = ad.timesteps(mid)
    torch.testing.assert_close(flow_coefficients(ab, ad.alpha_prod_final)[0], mid.double(), rtol=0, atol=1e-7)
    lo = torch.searchsorted(ad._sigma_table, mid) - 1
    assert bool(((t > lo) & (t < lo + 1)).all())
    torch.testing.assert_close(alpha_prod_from_sigma(sig_clean[500], 1.0), ac[500].double(), rtol=1e-12, atol=0)
    with pytest.warns(UserWarning, match="trained range"):
        t_hi, _ = ad.timesteps(torch.tensor([0.99]))
    assert t_hi.item() == 999
    with pytest.raises(ValueError, match="σ < 1"):
        ad.timesteps(torch.tensor([1.0]))


def test_initial_state_is_the_pipeline_noise_rescaled_for_the_first_step(ad, cond):
    """y_0 = ε/k_{t_0}: the UNet's first input k_{t_0}·y_0 is the pipeline's N(0, I) draw; it depends on N."""
    sched = ad.pipeline.scheduler
    for n in (4, 10):
        x = ad.initial_noise(_gens([7]), RES, RES, num_steps=n)
        sched.set_timesteps(n)
        k0 = float(ad.frame_scale(ad.sigmas(n)[:1]))
        _, ck0 = flow_coefficients(sched.alphas_cumprod[sched.timesteps[0]], ad.alpha_prod_final)
        assert k0 == float(ck0) and k0 > 1
        eps = torch.randn((1, 4, RES // 4, RES // 4), generator=_gens([7])[0])
        torch.testing.assert_close(x * k0, eps, rtol=1e-6, atol=1e-6)
    ad.sigmas(10)
    x = ad.initial_noise(_gens([7]), RES, RES)  # default: the latest grid
    sig4 = ad.sigmas(4)
    with pytest.warns(UserWarning, match="initial_noise"):  # a trajectory scaled for 10 steps fed to the 4-step grid
        ad.velocity(x, sig4[:1], cond[:1])
    fresh = UNetAdapter(ad.pipeline)
    with pytest.raises(RuntimeError, match="sigmas"):
        fresh.initial_noise(_gens([0]), RES, RES)


# --------------------------------------------------------------------------------------------------------------------
# (b) noise level 0 = the diffusers pipeline
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_noise_level_zero_reproduces_the_pipeline(ad, cond, guidance):
    """Every intermediate latent (k_{t_{i+1}}·y_{i+1}), the final latent and the decoded image agree with
    ``StableDiffusionPipeline(eta=0)`` — including its last step to ``final_alpha_cumprod`` (σ = 0 here)."""
    seeds, n = [3, 4, 5], 8
    ref, ref_steps = _pipeline(ad.pipeline, n, guidance, seeds)
    img, _ = _pipeline(ad.pipeline, n, guidance, seeds, output_type="pt")
    traj = _rollout(ad, cond, seeds, n, guidance)
    sig = traj.sigmas
    for i in range(n):
        k = ad.frame_scale(sig[i + 1 : i + 2]).float()
        scale = ref_steps[i].abs().max()
        assert (traj.latents[:, i + 1] * k - ref_steps[i]).abs().max() <= 5e-6 * scale
    assert (traj.final - ref).abs().max() <= 5e-6 * ref.abs().max()
    torch.testing.assert_close(ad.decode(traj.final), img.float(), rtol=0, atol=1e-5)
    assert not traj.train_mask.any() and torch.equal(traj.log_probs, torch.zeros(3, n))


def test_clean_terminal_is_ddim_to_alpha_one_and_ddim_eta_is_cps(ad, cond):
    """``terminal="clean"`` (σ = s/(α+s), σ = 0 is x0): ODE sampling = the pipeline with ``set_alpha_to_one=True``;
    CPS with :meth:`ddim_noise_levels` (η = 1, DDPO's policy) = the pipeline's stochastic DDIM with ``eta=1``, the
    same generators drawing the same step noise."""
    pipe = ad.pipeline
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config, set_alpha_to_one=True)
        clean = UNetAdapter(pipe, terminal="clean")
        seeds, n = [1, 2, 3], 5
        for eta in (0.0, 1.0):
            ref, _ = _pipeline(pipe, n, 4.0, seeds, eta=eta)
            levels = clean.ddim_noise_levels(eta, n)
            traj = _rollout(clean, cond, seeds, n, 4.0, levels=levels, kind="cps")
            assert (traj.final - ref).abs().max() <= 5e-6 * ref.abs().max()
            assert levels[-1] == 0 and (levels[:-1] > 0).all() == (eta > 0)
    finally:
        pipe.scheduler = original


# --------------------------------------------------------------------------------------------------------------------
# (c) stochastic steps: DDIM-η in the VP frame vs CPS in the flow frame; stored-step log-probs
# --------------------------------------------------------------------------------------------------------------------

def test_ddim_step_in_vp_frame_equals_cps_step_in_flow_frame(ad, cond):
    """One step, clean frame: ``ddim_step(k·y, ε̂, ᾱ_t, ᾱ_prev, η)`` = ``k'·cps_step(y, v, σ, σ', a(η))`` in sample,
    mean and std; the log-densities differ by exactly the Jacobian ``log k'`` (per dimension), so ratios agree."""
    clean = UNetAdapter(ad.pipeline, terminal="clean")
    n = 6
    sig = clean.sigmas(n)
    ts = clean.scheduler_timesteps(n)
    levels = clean.ddim_noise_levels(1.0, n)
    y = clean.initial_noise(_gens([0, 1, 2]), RES, RES)
    noise = randn_like_with(y, _gens([10, 11, 12]))
    for i in (0, 2, 4):
        v = clean.velocity(y, sig[i].expand(3), cond, 4.5)
        k, k_next = (float(clean.frame_scale(sig[j : j + 1])) for j in (i, i + 1))
        flow = cps_step(y, v, sig[i], sig[i + 1], levels[i], noise=noise)
        vp = ddim_step(y * k, velocity_to_eps(v, y, sig[i]), clean.alphas_cumprod[ts[i]],
                       clean.alphas_cumprod[ts[i + 1]], 1.0, noise=noise)
        scale = vp.prev_sample.abs().max()
        assert (flow.prev_sample * k_next - vp.prev_sample).abs().max() <= 2e-6 * scale
        assert (flow.mean * k_next - vp.mean).abs().max() <= 2e-6 * scale
        torch.testing.assert_close(flow.std * k_next, vp.std, rtol=1e-5, atol=0)
        torch.testing.assert_close(flow.log_prob - vp.log_prob, torch.full((3,), math.log(k_next)), rtol=0, atol=2e-4)
        y = flow.prev_sample


@pytest.mark.parametrize("terminal", ["scheduler", "clean"])
def test_stored_step_log_prob_recomputes_exactly(ad, cond, terminal):
    adapter = UNetAdapter(ad.pipeline, terminal=terminal)
    n = 5
    sig = adapter.sigmas(n)
    for kind, levels in (("sde", torch.full((n,), 0.7)), ("cps", adapter.ddim_noise_levels(1.0, n)),
                         ("dance", torch.full((n,), 0.3))):
        traj = _rollout(adapter, cond, [0, 1, 2], n, 4.5, levels=levels, kind=kind)
        f = step_fn(kind, float(sig[1]))
        for t in range(n - 1):
            v = adapter.velocity(traj.latents[:, t], sig[t].expand(3), cond, 4.5)
            out = f(traj.latents[:, t], v, sig[t], sig[t + 1], traj.noise_levels[:, t],
                    prev_sample=traj.latents[:, t + 1])
            assert torch.equal(torch.exp(out.log_prob - traj.log_probs[:, t]), torch.ones(3))
        assert traj.train_mask[:, : n - 1].all()


# --------------------------------------------------------------------------------------------------------------------
# (d) LoRA
# --------------------------------------------------------------------------------------------------------------------

def test_lora_saved_loads_into_the_pipeline(tiny_unet_path, tmp_path):
    lora_ad = UNetAdapter.from_pretrained(tiny_unet_path)
    params = lora_ad.add_lora(4, 8, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])  # SD3-only names are skipped
    assert params and set(lora_ad.unet.peft_config["default"].target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    lora_ad.save_lora(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_unet_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base, _ = _pipeline(pipe, 4, 5.0, [1])
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora, _ = _pipeline(pipe, 4, 5.0, [1])
    cond1 = lora_ad.encode(PROMPTS[:1])
    traj = _rollout(lora_ad, cond1, [1], 4, 5.0)
    with lora_ad.reference():
        ref_traj = _rollout(lora_ad, cond1, [1], 4, 5.0)
    assert (with_lora - base).abs().max() > 1e-3 * base.abs().max()  # the LoRA changes the output ...
    assert (traj.final - with_lora).abs().max() <= 5e-6 * with_lora.abs().max()  # ... identically in both
    assert (ref_traj.final - base).abs().max() <= 5e-6 * base.abs().max()  # disabling it restores the base


# --------------------------------------------------------------------------------------------------------------------
# (e) prediction types
# --------------------------------------------------------------------------------------------------------------------

def test_v_prediction_and_sample_conversions_are_exact_on_a_hand_made_case():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g,
                                                                                    dtype=torch.float64)
    ab = torch.tensor([0.9, 0.3, 0.02], dtype=torch.float64)
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    v_ddpm = a * eps - s * x0  # diffusers' v-prediction target
    torch.testing.assert_close(model_output_to_eps(v_ddpm.float(), x_t.float(), ab, "v_prediction"), eps.float(),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(model_output_to_eps(x0.float(), x_t.float(), ab, "sample"), eps.float(), rtol=0,
                               atol=2e-5)
    assert torch.equal(model_output_to_eps(eps.float(), x_t.float(), ab, "epsilon"), eps.float())
    # flow frame (clean terminal): y = x_t/(α+s), σ = s/(α+s); the flow velocity is ε - x0 and back
    sig, k = flow_coefficients(ab, 1.0)
    y = (x_t / k.view(-1, 1, 1, 1)).float()
    v = eps_to_velocity(eps.float(), y, sig)
    torch.testing.assert_close(v, (eps - x0).float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(velocity_to_eps(v, y, sig), eps.float(), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        model_output_to_eps(eps.float(), x_t.float(), ab, "flow")


def test_v_prediction_pipeline_is_reproduced(ad, cond):
    pipe = ad.pipeline
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config, prediction_type="v_prediction")
        vad = UNetAdapter(pipe)
        ref, _ = _pipeline(pipe, 5, 4.0, [1, 2, 3])
        traj = _rollout(vad, cond, [1, 2, 3], 5, 4.0)
        assert (traj.final - ref).abs().max() <= 5e-6 * ref.abs().max()
    finally:
        pipe.scheduler = original


# --------------------------------------------------------------------------------------------------------------------
# loading and shapes
# --------------------------------------------------------------------------------------------------------------------

def test_loading_errors_and_shapes(ad, tmp_path):
    other = tmp_path / "sd3"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="family=sd3"):
        UNetAdapter.from_pretrained(str(other))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        UNetAdapter.from_pretrained(str(tmp_path / "nope"))
    clipping = StableDiffusionPipeline(**ad.pipeline.components, requires_safety_checker=False)
    clipping.scheduler = DDIMScheduler.from_config(ad.pipeline.scheduler.config, clip_sample=True)
    with pytest.raises(ValueError, match="clip"):
        UNetAdapter(clipping)
    assert ad.latent_shape(64, 32) == (4, 16, 8)
    with pytest.raises(ValueError, match="multiples"):
        ad.latent_shape(60, 64)
    img = ad.decode(torch.randn(2, 4, 16, 16))
    assert img.shape == (2, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert ad.encode_images(img).shape == (2, 4, 16, 16)


def test_trainer_runs_ddpo_style_ddim_eta_rollouts(tiny_unet_path, tmp_path):
    """model.family=unet + sampler.ddim_eta=1 (DDPO's policy): the trainer's per-step levels are the adapter's DDIM-η
    levels, one Flow-GRPO epoch runs on-policy (first ratio exactly 1) and the config is refused for other families."""
    import pytest

    from flowrl.config import ConfigError, ModelConfig, TrainConfig, validate
    from flowrl.trainer import Trainer

    cfg = TrainConfig(model=ModelConfig(pretrained=tiny_unet_path, family="unet", resolution=64,
                                        lora_targets=["to_q", "to_k", "to_v", "to_out.0"], lora_rank=4, lora_alpha=4))
    s, t = cfg.sampler, cfg.trainer
    s.kind, s.ddim_eta, s.train_steps, s.eval_steps, s.timestep_fraction = "cps", 1.0, 4, 4, 0.75
    t.group_size, t.groups_per_epoch, t.micro_batch, t.epochs, t.optimizer_steps_per_epoch = 2, 2, 4, 1, 1
    t.output_dir, t.eval_base, t.threads = str(tmp_path / "run"), False, 1
    validate(cfg)
    tr = Trainer(cfg)
    assert torch.allclose(tr.step_levels, tr.adapter.ddim_noise_levels(1.0, 4))
    batch = tr.collect(0)
    assert torch.allclose(batch["traj"].noise_levels[0], tr.step_levels)
    stats = tr.update(batch["traj"], batch["cond"], batch["adv"])
    assert stats["first_ratio_max_dev"] == 0.0
    cfg.model.family = "sd3"
    with pytest.raises(ConfigError, match="ddim_eta"):
        validate(cfg)
