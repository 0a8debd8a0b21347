"""Differentiable-reward fine-tuning (``algorithm=draft``: DRaFT-K, DRaFT-LV, ReFL; flowrl/draft.py).

Tiny random SD3 pipeline (conftest) and a tiny random CLIP saved to a temporary folder (the builder of
test_model_rewards.py), both loaded through their real ``from_pretrained`` paths, offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flowrl.config import ConfigError, validate
from test_config_and_training import _compose, _small_cfg
from test_model_rewards import PROJ, _build, _head

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return str(_build(tmp_path_factory.mktemp("draft_clip") / "clip", seed=0))


@pytest.fixture(scope="module")
def lora_adapter(tiny_sd3_path):
    """Its own adapter (the session's tiny_adapter stays LoRA-free), LoRA rank 4 with B perturbed away from 0 so
    that the LoRA changes the velocity (with B = 0 the trained and the base policy coincide)."""
    from flowrl.models.sd3 import SD3Adapter

    ad = SD3Adapter.from_pretrained(tiny_sd3_path, max_sequence_length=0, load_t5=False)
    params = ad.add_lora(4, 8.0, None, init_seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ad.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ad.lora_params = params
    return ad


def _noise(ad, seeds):
    return ad.initial_noise([torch.Generator().manual_seed(s) for s in seeds], 64, 64)


def _smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear")
    return (x + 0.15 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


def _u8(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 ``[B, H, W, 3]`` and the same values as float ``[B, 3, H, W]`` in [0, 1]."""
    u8 = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return u8, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255


# -- (a) the differentiable reward protocol ---------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (40, 48), (100, 70), (20, 20)])
def test_torch_preprocessing_matches_the_numpy_reward(clip_dir, tmp_path, size):
    """Measured on the tiny CLIP (32 px crop): |Δcos| ≈ 1e-4-6e-4 (uint8 rounding inside PIL's resize), relative
    aesthetic difference ≈ 2e-4-7e-4. Asserted: |Δcos| ≤ 2e-3 (1e-3 of the cosine's range), aesthetic ≤ 1e-2 relative."""
    from flowrl_rewards.aesthetic import AestheticReward
    from flowrl_rewards.clip_score import CLIPScore
    from flowrl_rewards.pickscore import PickScore

    u8, x = _u8(_smooth_images(3, *size, seed=sum(size)))
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    for fn in (CLIPScore(model=clip_dir, device="cpu"), PickScore(model=clip_dir, processor=clip_dir, device="cpu")):
        ref = fn(u8, prompts)
        xg = x.clone().requires_grad_(True)
        got = fn.differentiable(xg, prompts)
        assert got.shape == (3,) and got.dtype == torch.float32 and got.requires_grad
        cos = got.detach().numpy() * fn.divisor / fn.embedder.logit_scale
        np.testing.assert_allclose(cos, ref["cosine"], atol=2e-3, rtol=0)
        np.testing.assert_allclose(got.detach().numpy(), ref["reward"], atol=2e-3 * fn.embedder.logit_scale / fn.divisor)
        got.sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0  # gradients reach the images ...
        assert all(not p.requires_grad and p.grad is None for p in fn.embedder.model.parameters())  # ... not CLIP
    torch.save(_head(PROJ, seed=5), tmp_path / "head.pth")
    aes = AestheticReward(head=str(tmp_path / "head.pth"), model=clip_dir, device="cpu")
    ref = aes(u8)["reward"]
    got = aes.differentiable(x.clone().requires_grad_(True))
    assert np.abs(got.detach().numpy() - ref).max() <= 1e-2 * np.abs(ref).max()
    assert all(not p.requires_grad for p in aes.head.parameters())


def test_is_differentiable_and_the_multi_reward_sum(clip_dir):
    from flowrl.rewards import (BUILTIN_REWARDS, DIFFERENTIABLE_REWARDS, MultiReward, is_differentiable, load_reward,
                                reward_is_differentiable)

    clip = load_reward("clip_score", model=clip_dir, device="cpu")
    assert is_differentiable(clip) and not is_differentiable(load_reward("geneval_shapes"))
    multi = MultiReward({"clip_score": {"weight": 1.0, "args": {"model": clip_dir}},
                         "pickscore": {"weight": 0.5, "args": {"model": clip_dir, "processor": clip_dir}}})
    assert is_differentiable(multi)
    x = _smooth_images(2, 64, 64, seed=0)
    want = clip.differentiable(x, PROMPTS) + 0.5 * multi.rewards["pickscore"].differentiable(x, PROMPTS)
    torch.testing.assert_close(multi.differentiable(x, PROMPTS), want)
    mixed = MultiReward({"clip_score": {"weight": 1.0, "args": {"model": clip_dir}}, "geneval_shapes": 1.0})
    assert not is_differentiable(mixed)
    with pytest.raises(TypeError, match="geneval_shapes"):
        mixed.differentiable(x, PROMPTS)
    # decided from the classes, without loading a model (config validation)
    assert [n for n in BUILTIN_REWARDS if reward_is_differentiable(n)] == list(DIFFERENTIABLE_REWARDS)
    assert reward_is_differentiable("multi", {"components": {"clip_score": 1.0, "aesthetic": {"weight": 2}}})
    assert not reward_is_differentiable("multi", {"components": {"clip_score": 1.0, "jpeg_compressibility": 1.0}})
    assert not reward_is_differentiable("no_such_reward")


# -- (b), (c) DRaFT-K: what gets gradients, and that the forward pass is the evaluation policy -------------------
def _reward_model(clip_dir):
    from flowrl_rewards.clip_score import CLIPScore

    return CLIPScore(model=clip_dir, device="cpu")


def test_draft_k1_gradient_reaches_only_the_lora(lora_adapter, clip_dir):
    from flowrl.draft import draft_forward

    ad, fn = lora_adapter, _reward_model(clip_dir)
    ad.transformer.zero_grad(set_to_none=True)
    calls = []
    velocity = ad.velocity

    def counting(x, s, c, g):
        calls.append((torch.is_grad_enabled(), x.shape[0]))
        return velocity(x, s, c, g)

    ad.velocity = counting
    try:
        out = draft_forward(ad, ad.encode(PROMPTS), _noise(ad, [0, 1]), ad.sigmas(4), 4.5, k=1)
    finally:
        del ad.velocity  # back to the class method
    assert calls == [(False, 2)] * 3 + [(True, 2)]  # T-K steps without a graph, K with
    assert out.images.shape == (2, 3, 64, 64) and out.images.requires_grad
    (-fn.differentiable(out.images, PROMPTS).mean()).backward()
    lora = [(n, p) for n, p in ad.transformer.named_parameters() if "lora_" in n]
    assert {id(p) for _, p in lora} == {id(p) for p in ad.lora_params}
    assert sum(float(p.grad.abs().sum()) for _, p in lora if p.grad is not None) > 0
    assert sum(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in lora) >= len(lora) // 2
    frozen = [p for n, p in ad.transformer.named_parameters() if "lora_" not in n]
    for module in (ad.pipeline.vae, ad.pipeline.text_encoder, ad.pipeline.text_encoder_2, fn.embedder.model):
        frozen += list(module.parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    ad.transformer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_no_grad_prefix_and_grad_suffix_give_the_evaluation_image(lora_adapter, k):
    """Bit-identical to flowrl.evaluation.generate (ODE, same seeds, CFG, steps): DRaFT trains the evaluated policy."""
    from flowrl.draft import draft_forward
    from flowrl.evaluation import generate, to_uint8
    from flowrl.flow.rollout import sample_trajectory

    ad, seeds, steps, g = lora_adapter, [11, 12], 4, 4.5
    cond = ad.encode(PROMPTS)
    out = draft_forward(ad, cond, _noise(ad, seeds), ad.sigmas(steps), g, k=k)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    traj = sample_trajectory(lambda z, s: ad.velocity(z, s, cond, g), ad.initial_noise(gens, 64, 64),
                             ad.sigmas(steps), torch.zeros(steps), kind="sde", generators=gens)
    assert torch.equal(out.final.detach(), traj.final)
    assert torch.equal(out.images.detach(), ad.decode(traj.final))
    np.testing.assert_array_equal(to_uint8(out.images.detach()), generate(ad, PROMPTS, seeds, steps, g, 64))


def test_draft_lv_renoises_the_final_latent(lora_adapter, clip_dir):
    from flowrl.draft import draft_forward

    ad, sig = lora_adapter, lora_adapter.sigmas(4)
    cond, x = ad.encode(PROMPTS), _noise(ad, [3, 4])
    lv = torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(0))
    out = draft_forward(ad, cond, x, sig, 4.5, k=1, lv_noise=lv)
    assert out.images.shape == (6, 3, 64, 64)
    plain = draft_forward(ad, cond, x, sig, 4.5, k=1)
    torch.testing.assert_close(out.images[:2], plain.images)  # the samples' own images are unchanged
    with torch.no_grad():  # block j: x0 re-noised to σ_{T-1} with ε_j, then the last step
        s = sig[3]
        x_s = (1 - s) * plain.final + s * lv[1]
        x0 = x_s + ad.velocity(x_s, s.expand(2), cond, 4.5) * (0 - s)
    torch.testing.assert_close(out.images[4:6], ad.decode(x0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="DRaFT-LV needs k = 1"):
        draft_forward(ad, cond, x, sig, 4.5, k=2, lv_noise=lv)
    ad.transformer.zero_grad(set_to_none=True)
    _reward_model(clip_dir).differentiable(out.images, PROMPTS * 3).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in ad.lora_params if p.grad is not None) > 0
    ad.transformer.zero_grad(set_to_none=True)


# -- (e) ReFL -----------------------------------------------------------------------------------------------------
def test_refl_predicts_x0_from_a_random_step_and_gives_gradients(lora_adapter, clip_dir):
    from flowrl.draft import draft_forward, refl_forward
    from flowrl.flow.rollout import sample_trajectory

    ad, sig, g = lora_adapter, lora_adapter.sigmas(4), 4.5
    prompts = PROMPTS * 2
    cond, x = ad.encode(prompts), _noise(ad, [5, 6, 7, 8])
    stop = torch.tensor([0, 2, 3, 1])
    ad.transformer.zero_grad(set_to_none=True)
    out = refl_forward(ad, cond, x, sig, g, stop)
    traj = sample_trajectory(lambda z, s: ad.velocity(z, s, cond, g), x, sig, torch.zeros(4), kind="sde")
    with torch.no_grad():
        for i, t in enumerate(stop.tolist()):  # x̂0 = x_t - σ_t·v(x_t, σ_t)
            x_t = traj.latents[i : i + 1, t]
            want = x_t - sig[t] * ad.velocity(x_t, sig[t].expand(1), cond[i : i + 1], g)
            torch.testing.assert_close(out.final[i : i + 1], want, atol=1e-5, rtol=1e-5)
    last = refl_forward(ad, cond, x, sig, g, torch.full((4,), 3))  # t = T-1: DRaFT-1's image
    torch.testing.assert_close(last.images, draft_forward(ad, cond, x, sig, g, k=1).images, atol=1e-5, rtol=1e-5)
    (-_reward_model(clip_dir).differentiable(out.images, prompts).mean()).backward()
    assert sum(float(p.grad.abs().sum()) for p in ad.lora_params if p.grad is not None) > 0
    assert all(p.grad is None for p in ad.pipeline.vae.parameters())
    ad.transformer.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="stop_steps"):
        refl_forward(ad, cond, x, sig, g, torch.tensor([0, 1, 2, 4]))


# -- (d) the update raises the reward; normalisation by the global batch --------------------------------------------
def _draft_cfg(model, clip_dir, out, tmp_path, **algo):
    cfg = _small_cfg(model, out, eval_base=False, lr=1e-2, ema=False)
    cfg.algorithm = OmegaConf.to_object(_compose(["algorithm=draft"])).algorithm
    for k, v in algo.items():
        setattr(cfg.algorithm, k, v)
    cfg.reward.name, cfg.reward.args = "clip_score", {"model": clip_dir, "device": "cpu"}
    cfg.model.lora_rank, cfg.model.lora_alpha = 4, 8.0
    rec = json.loads((ROOT / "assets" / "prompts" / "shapes_train.jsonl").read_text().splitlines()[0])
    (tmp_path / "one.jsonl").write_text(json.dumps(rec) + "\n")
    cfg.data.train = cfg.data.test = str(tmp_path / "one.jsonl")
    t = cfg.trainer
    t.group_size, t.groups_per_epoch, t.micro_batch, t.optimizer_steps_per_epoch = 4, 1, 2, 1
    validate(cfg)
    return cfg, rec["prompt"]


def test_a_few_draft_steps_raise_the_reward_on_fixed_seeds(tiny_sd3_path, clip_dir, tmp_path):
    """Measured (lr 1e-2, 4 samples per update, held-out seeds 100-103 never trained on): 0.18 → 0.89 after 5
    updates (training rewards 0.18, 0.21, 0.34, 0.57, 0.79; at lr 3e-3: 0.18 → 0.33); the tiny CLIP's reward lies in
    [-3.33, 3.33]. Asserted: a rise of at least 0.2."""
    from flowrl.draft import draft_forward
    from flowrl.trainer import Trainer

    cfg, prompt = _draft_cfg(tiny_sd3_path, clip_dir, tmp_path / "run", tmp_path)
    tr = Trainer(cfg)
    ad = tr.adapter
    cond = ad.encode([prompt] * 4)

    def held_out():
        with torch.no_grad():
            out = draft_forward(ad, cond, _noise(ad, [100, 101, 102, 103]), ad.sigmas(4), 4.5, k=1)
            return float(tr.reward_fn.differentiable(out.images, [prompt] * 4).mean())

    before = held_out()
    rewards = []
    for epoch in range(5):
        stats, images = tr.draft.update(epoch)
        rewards.append(stats["reward/mean"])
        assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
        assert stats["train/draft_loss"] == pytest.approx(-stats["reward/mean"], abs=1e-6)
    after = held_out()
    assert after > before + 0.2, (before, after, rewards)
    assert rewards[-1] > rewards[0]
    assert tr.opt_steps == 5 and len(tr.grad_norms) == 5


def test_micro_batching_does_not_change_the_gradient(tiny_sd3_path, clip_dir, tmp_path):
    """The loss is divided by the global batch: accumulating 2 + 2 samples gives the gradient of -mean reward over 4
    (and the ReFL path is seeded per sample, independent of the micro-batch)."""
    from flowrl.trainer import Trainer

    cfg, _ = _draft_cfg(tiny_sd3_path, clip_dir, tmp_path / "run", tmp_path, draft_mode="refl",
                        refl_step_range=[1, 4])
    tr = Trainer(cfg)
    grads = []

    def capture():
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.params])
        tr.opt.zero_grad(set_to_none=True)

    tr._optimizer_step = capture
    stats = []
    for mb in (2, 4, 1):
        tr.cfg.trainer.micro_batch = mb
        stats.append(tr.draft.update(0)[0])
    assert stats[0]["train/refl_step"] == stats[1]["train/refl_step"] == stats[2]["train/refl_step"]
    assert 1 <= stats[0]["train/refl_step"] < 4
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    assert stats[0]["reward/mean"] == pytest.approx(stats[1]["reward/mean"], abs=1e-5)


# -- (f) refusals ---------------------------------------------------------------------------------------------------
def _cfg(*overrides):
    return OmegaConf.to_object(_compose(["algorithm=draft", *overrides]))


def test_valid_draft_configs_validate():
    validate(_cfg("reward=clip_score"))
    validate(_cfg("reward=clip_score", "sampler=ode", "algorithm.draft_mode=refl", "algorithm.draft_k=10"))
    validate(_cfg("reward.name=multi", "+reward.args.components={clip_score: 1.0, pickscore: 0.5}"))
    validate(_cfg("reward=clip_score", "algorithm.draft_lv_samples=2", "trainer.group_size=1",
                  "trainer.micro_batch=8"))


@pytest.mark.parametrize("overrides,needles", [
    ([], ["reward=geneval_shapes is not differentiable", "reward=clip_score", "clip_score, pickscore, aesthetic",
          "algorithm.draft_eval_reward=geneval_shapes"]),
    (["reward.name=multi", "+reward.args.components={clip_score: 1.0, geneval_shapes: 1.0}"],
     ["not every component of reward=multi is differentiable", "reward=clip_score"]),
    (["reward=clip_score", "algorithm.draft_k=0"], ["algorithm.draft_k=0", "1 ≤ draft_k ≤ 10"]),
    (["reward=clip_score", "algorithm.draft_k=11"], ["algorithm.draft_k=11", "1 ≤ draft_k ≤ 10"]),
    (["reward=clip_score", "algorithm.draft_mode=drift"], ["algorithm.draft_mode='drift'", "choose 'draft'", "'refl'"]),
    (["reward=clip_score", "algorithm.draft_mode=refl", "algorithm.refl_step_range=[8,11]"],
     ["refl_step_range=[8, 11]", "0 ≤ lo < hi ≤ 10", "e.g. [7, 10]"]),
    (["reward=clip_score", "algorithm.draft_mode=refl", "algorithm.refl_step_range=[-1,3]"], ["0 ≤ lo < hi ≤ 10"]),
    (["reward=clip_score", "algorithm.draft_mode=refl", "algorithm.refl_step_range=[5,5]"], ["0 ≤ lo < hi ≤ 10"]),
    (["reward=clip_score", "algorithm.draft_k=2", "algorithm.draft_lv_samples=2"],
     ["DRaFT-LV", "set algorithm.draft_k=1"]),
    (["reward=clip_score", "algorithm.kl_beta=0.04"], ["set algorithm.kl_beta=0"]),
    (["reward=clip_score", "algorithm.draft_reward_scale=0"], ["draft_reward_scale=0"]),
])
def test_draft_refusals_name_the_fix(overrides, needles):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(*overrides))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_trainer_refuses_a_non_differentiable_reward_it_loaded(tiny_sd3_path, clip_dir, tmp_path, monkeypatch):
    """A reward validate could not see through (here: patched after validation) is refused when the trainer starts."""
    import flowrl.trainer as trainer_mod
    from flowrl.trainer import Trainer

    cfg, _ = _draft_cfg(tiny_sd3_path, clip_dir, tmp_path / "run", tmp_path)
    real = trainer_mod.load_reward
    monkeypatch.setattr(trainer_mod, "load_reward", lambda name, **kw: real("geneval_shapes"))
    with pytest.raises(ConfigError, match="reward=clip_score"):
        Trainer(cfg)


# -- (g) smoke run through Trainer.run ------------------------------------------------------------------------------
def test_two_epoch_draft_run_logs_and_evaluates(tiny_sd3_path, clip_dir, tmp_path):
    from flowrl.trainer import Trainer

    cfg = OmegaConf.to_object(_compose([f"model.pretrained={tiny_sd3_path}", "algorithm=draft", "reward=clip_score",
                                        "sampler=ode", f"reward.args.model={clip_dir}",
                                        "algorithm.draft_eval_reward=geneval_shapes"]))
    t = cfg.trainer
    t.epochs, t.group_size, t.groups_per_epoch, t.micro_batch, t.optimizer_steps_per_epoch = 2, 2, 2, 2, 2
    t.eval_max_prompts, t.eval_images_per_prompt, t.eval_batch, t.output_dir = 2, 1, 8, str(tmp_path / "run")
    t.save_every, t.log_images_every, t.eval_base = 1, 1, True
    cfg.sampler.train_steps, cfg.sampler.eval_steps = 4, 4
    tr = Trainer(cfg)
    before = [p.detach().clone() for p in tr.params]
    res = tr.run()
    assert len(res["history"]) == 2 and tr.opt_steps == 4
    for h in res["history"]:
        for key in ("reward/mean", "reward/std", "train/draft_loss", "train/grad_norm", "reward/strict",
                    "reward/geneval_shapes"):
            assert key in h and math.isfinite(h[key]), key
        assert h["train/draft_loss"] == pytest.approx(-h["reward/mean"], abs=1e-6)
        assert 0 <= h["reward/strict"] <= 1
    assert any((a - b).abs().max() > 0 for a, b in zip(tr.params, before))
    out = tmp_path / "run"
    assert (out / "images" / "epoch_0001.png").is_file() and (out / "checkpoints" / "final" / "lora").is_dir()
    # held-out images scored by the benchmark (draft_eval_reward), not the differentiable proxy
    for k in ("base", "trained"):
        assert 0 <= res[k]["overall"] <= 1 and "tasks" in res[k] and "cosine" not in res[k]
