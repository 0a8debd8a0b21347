"""The SANA adapter + rollout against diffusers' own ``SanaPipeline``, on a tiny random SANA saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline

from flowrl.flow.rollout import sample_trajectory, step_fn
from flowrl.models.sana import SanaAdapter
from flowrl.models.tiny_sana import GEMMA_MAX_LENGTH

PROMPTS = ["a photo of a red circle", "a photo of two stars", "a photo of a square left of a star"]


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def tiny_sana_path(tmp_path_factory):
    from flowrl.models.tiny_sana import tiny_random_sana_pipeline

    return str(tiny_random_sana_pipeline(tmp_path_factory.mktemp("models") / "tiny_sana", seed=0))


@pytest.fixture(scope="module")
def ad(tiny_sana_path):
    return SanaAdapter.from_pretrained(tiny_sana_path, max_sequence_length=GEMMA_MAX_LENGTH)


def _rollout(adapter, prompts, seeds, steps, height, width, guidance, noise_level=0.0, kind="sde"):
    gens = _gens(seeds)
    x = adapter.initial_noise(gens, height, width)
    cond = adapter.encode(prompts)
    return sample_trajectory(lambda z, s: adapter.velocity(z, s, cond, guidance), x, adapter.sigmas(steps),
                             torch.full((steps,), noise_level), kind=kind, generators=gens)


def _pipe_kw(steps, guidance, height, width, **kw):
    return dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                max_sequence_length=GEMMA_MAX_LENGTH, use_resolution_binning=False, **kw)


def test_scheduler_is_replaced_by_the_equivalent_euler_one(ad, tiny_sana_path):
    """The checkpoint's DPM-Solver++ (flow sigmas, shift 3) becomes FlowMatchEuler with shift 3; σ starts at 1."""
    saved = SanaPipeline.from_pretrained(tiny_sana_path).scheduler
    assert isinstance(saved, DPMSolverMultistepScheduler)
    sched = ad.pipeline.scheduler
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler) and sched.config.shift == saved.config.flow_shift == 3.0
    sig = ad.sigmas(5)
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    t = torch.linspace(1, shift(torch.tensor(1e-3, dtype=torch.float64)), 5, dtype=torch.float64)
    torch.testing.assert_close(sig, torch.cat([shift(t), torch.zeros(1, dtype=torch.float64)]).float(),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(ad.sigmas(5, 64, 64), ad.sigmas(5, 128, 32))  # no resolution-dependent shift
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        SanaAdapter(SanaPipeline(**{**ad.pipeline.components,
                                    "scheduler": DPMSolverMultistepScheduler()}))


@pytest.mark.parametrize("height,width,guidance", [(64, 64, 4.5), (64, 32, 1.0)])
def test_noise_level_zero_reproduces_the_pipeline(ad, height, width, guidance):
    """Same seeds and steps: latents bit for bit (instruction + attention mask, CFG batch, timestep scaling), decoded
    images within float tolerance."""
    seeds = [3, 4, 5]
    kw = _pipe_kw(5, guidance, height, width)
    ref = ad.pipeline(PROMPTS, generator=_gens(seeds), output_type="latent", **kw).images
    ref_img = ad.pipeline(PROMPTS, generator=_gens(seeds), output_type="pt", **kw).images
    traj = _rollout(ad, PROMPTS, seeds, 5, height, width, guidance)
    assert traj.final.shape == (3, *ad.latent_shape(height, width))
    torch.testing.assert_close(traj.final, ref.float(), rtol=0, atol=1e-5)
    assert torch.equal(traj.final, ref.float())
    torch.testing.assert_close(ad.decode(traj.final), ref_img.float(), rtol=0, atol=1e-5)
    assert not traj.train_mask.any() and torch.equal(traj.log_probs, torch.zeros(3, 5))


def test_prompt_encoding_uses_the_instruction_and_a_mask(ad):
    emb = ad.encode(PROMPTS)
    assert emb.prompt_embeds.shape == (3, GEMMA_MAX_LENGTH, 32) and emb.attention_mask.shape == (3, GEMMA_MAX_LENGTH)
    assert emb.attention_mask[:, 0].all() and not emb.attention_mask.all()  # <bos> kept, right padding masked
    plain = SanaAdapter(ad.pipeline, max_sequence_length=GEMMA_MAX_LENGTH, complex_human_instruction=False)
    assert (plain.encode(PROMPTS).prompt_embeds - emb.prompt_embeds).abs().max() > 1e-4
    neg = ad.negative(2)
    assert neg.prompt_embeds.shape == (2, GEMMA_MAX_LENGTH, 32) and ad.negative(2) is neg
    sub = emb[[0, 2]].repeat_interleave(2)
    assert sub.prompt_embeds.shape[0] == 4 and torch.equal(type(emb).cat([sub, sub]).attention_mask[4:],
                                                           sub.attention_mask)


@pytest.mark.parametrize("kind,level", [("sde", 0.9), ("cps", 0.8)])
def test_stored_step_log_prob_recomputes_exactly(ad, kind, level):
    """First on-policy ratio exactly 1: recomputing each step's log-prob from the stored latents (CFG on)."""
    cond = ad.encode(PROMPTS)
    sig = ad.sigmas(4)
    traj = _rollout(ad, PROMPTS, [0, 1, 2], 4, 64, 64, 4.5, noise_level=level, kind=kind)
    assert traj.train_mask[:, :3].all()
    f = step_fn(kind, float(sig[1]))
    for t in range(3):
        v = ad.velocity(traj.latents[:, t], sig[t].expand(3), cond, 4.5)
        out = f(traj.latents[:, t], v, sig[t], sig[t + 1], traj.noise_levels[:, t],
                prev_sample=traj.latents[:, t + 1])
        assert torch.equal(torch.exp(out.log_prob - traj.log_probs[:, t]), torch.ones(3))


def test_decode_encode_and_latent_shape(ad):
    assert ad.latent_shape(64, 32) == (4, 16, 8)
    img = ad.decode(torch.randn(2, 4, 16, 8))
    assert img.shape == (2, 3, 64, 32) and img.min() >= 0 and img.max() <= 1
    z = ad.encode_images(img)
    assert z.shape == (2, 4, 16, 8) and z.dtype == torch.float32
    assert torch.equal(z, ad.encode_images(img, torch.Generator().manual_seed(0)))  # deterministic encoder
    with pytest.raises(ValueError, match="multiples of 32"):
        ad.latent_shape(48, 64)


def test_lora_saved_loads_into_the_pipeline(tiny_sana_path, tmp_path):
    adapter = SanaAdapter.from_pretrained(tiny_sana_path, max_sequence_length=GEMMA_MAX_LENGTH)
    params = adapter.add_lora(4, 8)
    names = [n for n, _ in adapter.transformer.named_parameters() if "lora_" in n]
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    cond = adapter.encode(PROMPTS[:1])
    x = adapter.initial_noise(_gens([1]), 64, 64)
    adapter.velocity(x, torch.full((1,), 0.5), cond, 4.5).pow(2).mean().backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        for p in params:
            p.grad = None
            p.add_(torch.randn_like(p) * 0.1)
    adapter.save_lora(tmp_path / "lora")

    kw = dict(_pipe_kw(3, 4.5, 64, 64), output_type="latent")
    pipe = SanaPipeline.from_pretrained(tiny_sana_path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    base_pipe = pipe(PROMPTS[:1], generator=_gens([1]), **kw).images
    pipe.load_lora_weights(tmp_path / "lora")
    lora_pipe = pipe(PROMPTS[:1], generator=_gens([1]), **kw).images

    traj = _rollout(adapter, PROMPTS[:1], [1], 3, 64, 64, 4.5)
    torch.testing.assert_close(traj.final, lora_pipe.float(), rtol=1e-4, atol=1e-5)
    with adapter.reference():
        base = _rollout(adapter, PROMPTS[:1], [1], 3, 64, 64, 4.5)
    torch.testing.assert_close(base.final, base_pipe.float(), rtol=1e-4, atol=1e-5)
    assert (lora_pipe - base_pipe).abs().max() > 1e-3  # the loaded LoRA changes the pipeline's output


def test_missing_or_wrong_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json.*Sana_1600M"):
        SanaAdapter.from_pretrained(str(tmp_path / "nope"))
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*family=flux"):
        SanaAdapter.from_pretrained(str(flux))


def test_trainer_runs_flow_grpo_on_sana(tiny_sana_path, tmp_path):
    """`model.family=sana` goes through the same trainer (2 epochs, CFG on): on-policy first ratio exactly 1, the
    LoRA moves, and the held-out evaluation runs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from flowrl.config import register_configs
    from flowrl.trainer import Trainer

    register_configs()
    cfg_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        cfg = OmegaConf.to_object(compose("train", overrides=[
            "model=sana_1600m", f"model.pretrained={tiny_sana_path}", "model.dtype=float32", "model.resolution=64",
            f"model.max_sequence_length={GEMMA_MAX_LENGTH}", "model.gradient_checkpointing=false", "sampler=sde",
            "sampler.guidance_scale=4.5", "sampler.eval_guidance_scale=4.5", "sampler.train_steps=4",
            "sampler.eval_steps=4", "trainer.epochs=2", "trainer.group_size=2", "trainer.groups_per_epoch=2",
            "trainer.micro_batch=4", "trainer.eval_max_prompts=2", "trainer.eval_images_per_prompt=1",
            f"trainer.output_dir={tmp_path / 'run'}", "trainer.save_every=0", "trainer.log_images_every=0"]))
    tr = Trainer(cfg)
    assert tr.adapter.family == "sana"
    before = [p.detach().clone() for p in tr.params]
    res = tr.run()
    assert len(res["history"]) == 2
    assert all(h["train/first_ratio_max_dev"] == 0.0 for h in res["history"])
    assert any((a - b).abs().max() > 0 for a, b in zip(tr.params, before))
    assert "overall" in res["trained"]
