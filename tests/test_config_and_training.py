"""Config composition and validation, start-up errors, a 2-iteration training smoke run and the NaN-reward stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flowrl.config import ConfigError, TrainConfig, register_configs, to_train_config, validate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
register_configs()


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# groups of configs/train.yaml (configs/vlm is the VLM branch's own root, configs/accelerate holds launcher files)
GROUP_OPTIONS = [(g.name, f.stem) for g in sorted(CONFIGS.iterdir())
                 if g.is_dir() and g.name not in ("experiment", "accelerate", "vlm") for f in sorted(g.glob("*.yaml"))]


# options that are only valid together with another group's option (validated as a pair)
COMPANIONS = {("sampler", "ode"): ["algorithm=nft"], ("algorithm", "raft"): ["sampler=ode"],
              ("algorithm", "draft"): ["reward=clip_score", "sampler=ode"],
              ("algorithm", "rpo"): ["reward=lambda_harmonic", "sampler=ode"]}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_config_group_option_composes_and_validates(group, option):
    cfg: TrainConfig = OmegaConf.to_object(_compose([f"{group}={option}", *COMPANIONS.get((group, option), [])]))
    d = validate(cfg)
    if (group, option) == ("sampler", "ode"):  # refused with a likelihood-ratio update
        with pytest.raises(ConfigError, match="noise_level must be > 0"):
            validate(OmegaConf.to_object(_compose(["sampler=ode"])))
    assert d.samples_per_epoch == cfg.trainer.group_size * cfg.trainer.groups_per_epoch


@pytest.mark.parametrize("exp", sorted(f.stem for f in (CONFIGS / "experiment").glob("*.yaml")))
def test_experiments_compose(exp):
    cfg: TrainConfig = OmegaConf.to_object(_compose([f"+experiment={exp}"]))
    validate(cfg, world_size=1 if exp.startswith("shapes") else 8)  # the embedded-model recipes are CPU runs
    if exp == "sd3_5_medium_geneval":
        assert cfg.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"
        assert cfg.trainer.group_size == 24 and cfg.trainer.groups_per_epoch == 48 and cfg.model.resolution == 512
    if exp == "shapes_ocr":
        assert cfg.reward.name == "ocr" and cfg.model.load_t5 and cfg.data.train.endswith("text_train.jsonl")


def test_unknown_key_fails_at_composition(tmp_path):
    with pytest.raises(Exception, match="lora_rnk"):
        _compose(["model.lora_rnk=4"])
    with pytest.raises(ConfigError, match="trainer.not_a_key"):
        to_train_config(_compose(["+trainer.not_a_key=1"]))
    # a typo inside a group file is caught by the schema too
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "configs")
    (tmp_path / "configs" / "model" / "typo.yaml").write_text("pretrained: x\nlora_rnk: 4\n")
    with initialize_config_dir(config_dir=str(tmp_path / "configs"), version_base="1.3"):
        with pytest.raises(Exception, match="lora_rnk"):
            compose(config_name="train", overrides=["model=typo"])


def test_impossible_batch_arithmetic_says_what_to_change():
    cfg: TrainConfig = OmegaConf.to_object(_compose())
    cfg.trainer.group_size, cfg.trainer.groups_per_epoch, cfg.trainer.micro_batch = 5, 3, 4
    with pytest.raises(ConfigError, match="micro_batch"):
        validate(cfg)
    cfg.trainer.micro_batch = 5
    with pytest.raises(ConfigError, match="does not divide across 2 ranks"):
        validate(cfg, world_size=2)
    cfg.trainer.micro_batch, cfg.trainer.optimizer_steps_per_epoch = 5, 2
    with pytest.raises(ConfigError, match="optimizer_steps_per_epoch"):
        validate(cfg)
    cfg.trainer.optimizer_steps_per_epoch = 3
    validate(cfg)
    cfg.sampler.noise_level = 0.0
    with pytest.raises(ConfigError, match="ODE"):
        validate(cfg)
    cfg.sampler.noise_level, cfg.sampler.sde_window = 0.7, 9
    with pytest.raises(ConfigError, match="window"):
        validate(cfg)


def _small_cfg(model_path, out, **trainer):
    cfg: TrainConfig = OmegaConf.to_object(_compose([f"model.pretrained={model_path}"]))
    t = cfg.trainer
    t.epochs, t.group_size, t.groups_per_epoch, t.micro_batch, t.optimizer_steps_per_epoch = 2, 4, 2, 4, 1
    t.eval_max_prompts, t.eval_images_per_prompt, t.eval_batch, t.output_dir = 3, 1, 8, str(out)
    t.save_every, t.log_images_every = 1, 1
    cfg.sampler.train_steps, cfg.sampler.eval_steps = 4, 4
    for k, v in trainer.items():
        setattr(t, k, v)
    return cfg


def _register_reward(tmp_path, monkeypatch, key: str, module: str, cls: str, source: str) -> None:
    """Write ``source`` as ``<tmp_path>/<module>.py`` and register its class ``cls`` as the reward ``key``."""
    from flowrl import rewards

    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, key, f"{module}:{cls}")


def test_two_iteration_training_smoke(tiny_sd3_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowrl.trainer import Trainer

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_every=1)
    tr = Trainer(cfg)
    before = [p.detach().clone() for p in tr.params]
    res = tr.run()
    assert len(res["history"]) == 2
    h0 = res["history"][0]
    assert h0["train/first_ratio_max_dev"] == 0.0  # on-policy: the first ratio is exactly 1
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in res["history"])
    assert any((a - b).abs().max() > 0 for a, b in zip(tr.params, before))  # the LoRA moved
    for key in ("overall", "tasks", "correct_images"):
        assert key in res["base"] and key in res["trained"]
    out = tmp_path / "run"
    assert (out / "eval" / "comparison.md").is_file() and (out / "history.jsonl").is_file()
    per_image = {m: [json.loads(x)["reward"] for x in (out / "eval" / m / "results.jsonl").read_text().splitlines()]
                 for m in ("base", "trained")}  # 3 prompts x 1 image: the paired mean is the difference of means
    assert res["paired"]["n_prompts"] == 3
    assert res["paired"]["mean"] == pytest.approx(np.mean(per_image["trained"]) - np.mean(per_image["base"]))
    assert "paired by prompt" in (out / "eval" / "comparison.md").read_text()
    # eval_every=1: a held-out evaluation after epoch 1; the last epoch's is the final one, not run a second time
    assert sorted(p.name for p in (out / "eval").iterdir() if p.is_dir()) == ["base", "epoch_0001", "trained"]
    assert list((out / "tensorboard").iterdir()) and (out / "images" / "epoch_0000.png").is_file()
    assert (out / "eval" / "base" / "images" / "00000" / "samples" / "0000.png").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(out / "checkpoints" / "final" / "lora")  # loadable by diffusers


def test_ocr_prompt_files_train_with_the_ocr_reward(tiny_sd3_path, tmp_path):
    """The trainer reads OCR prompt files (no GenEval ``include``), hands the quoted word to the OCR reward as
    ``text``, and reports the held-out OCR reward per tag."""
    from flowrl.prompt_sets import load_prompt_set
    from flowrl.trainer import Trainer

    cfg: TrainConfig = OmegaConf.to_object(_compose([f"model.pretrained={tiny_sd3_path}", "reward=ocr_shapes",
                                                     "data=shapes_text"]))
    t = cfg.trainer
    t.epochs, t.group_size, t.groups_per_epoch, t.micro_batch, t.optimizer_steps_per_epoch = 1, 2, 2, 4, 1
    t.eval_max_prompts, t.eval_images_per_prompt, t.eval_batch, t.output_dir = 24, 1, 24, str(tmp_path / "run")
    t.save_every, t.log_images_every = 0, 0
    cfg.sampler.train_steps, cfg.sampler.eval_steps = 2, 2
    tr = Trainer(cfg)
    assert all('"' + m["text"] + '"' in m["prompt"] for m in tr.train_md)
    res = tr.run()
    assert "tasks" not in res["base"] and 0.0 <= res["base"]["overall"] <= 1.0
    assert set(res["base"]["by_tag"]) == {"ocr", "ocr_new_word"}  # the first 24 held-out prompts hold both tags
    # a plain prompt list is read too; an unknown kind is refused by validate
    plain = tmp_path / "p.txt"
    plain.write_text("a red circle\n\na blue square\n")
    assert [m["prompt"] for m in load_prompt_set(plain).records] == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="no target text"):
        load_prompt_set(plain, "ocr")
    cfg.data.kind = "csv"
    with pytest.raises(ConfigError, match="data.kind"):
        validate(cfg)


def test_nan_reward_stops_after_saving(tiny_sd3_path, tmp_path, monkeypatch):
    from flowrl.trainer import Trainer

    _register_reward(tmp_path, monkeypatch, "nan_test", "nan_reward_mod", "NaNReward",
        "import numpy as np\n"
        "class NaNReward:\n"
        "    name = 'nan'\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        r = np.zeros(len(images), dtype=np.float32); r[1] = np.nan\n"
        "        return {'reward': r}\n")
    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.reward.name = "nan_test"
    tr = Trainer(cfg)
    with pytest.raises(RuntimeError, match="NaN/inf") as e:
        tr.run()
    assert "saved to" in str(e.value)
    ckpt = tmp_path / "run" / "checkpoints" / "nan_reward_epoch_0000"
    assert (ckpt / "lora").is_dir() and (ckpt / "trainer_state.pt").is_file()
    assert (tmp_path / "run" / "nan_reward_images.png").is_file()


def test_nan_loss_stops_without_applying_the_step(tiny_sd3_path, tmp_path):
    """Fault: a NaN loss. The optimizer step is not applied, the last good weights are saved, the message says how
    to resume."""
    import dataclasses

    from flowrl.trainer import Trainer

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    tr = Trainer(cfg)
    before = [p.detach().clone() for p in tr.params]
    loss_fn = tr.policy_loss

    def nan_loss(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    tr.policy_loss = nan_loss
    with pytest.raises(RuntimeError, match="non-finite gradient") as e:
        tr.run()
    assert "trainer.resume=" in str(e.value) and "not applied" in str(e.value)
    ckpt = tmp_path / "run" / "checkpoints" / "nan_loss_epoch_0000"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["epoch"] == -1
    for a, b, c in zip(before, tr.params, state["params"]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_full_disk_when_saving_keeps_the_last_checkpoint(tiny_sd3_path, tmp_path, monkeypatch):
    """Fault: the disk fills up while a checkpoint is written. No partial folder is left, the previous checkpoint
    stays loadable, and the error names it."""
    import errno

    import flowrl.trainer as trainer_mod
    from flowrl.trainer import Trainer

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    tr = Trainer(cfg)
    good = tr.save("epoch_0001", 0, [])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_mod.torch, "save", full)
    with pytest.raises(RuntimeError, match="disk full") as e:
        tr.save("epoch_0002", 1, [])
    assert str(good) in str(e.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / "epoch_0002").exists() and not (ckpts / "epoch_0002.tmp").exists()
    monkeypatch.undo()
    assert tr.find_checkpoint("auto") == good
    assert torch.load(good / "trainer_state.pt", weights_only=False)["epoch"] == 0


def test_mixed_precision_autocasts_the_transformer_and_keeps_steps_fp32(tiny_sd3_path, tmp_path):
    """trainer.mixed_precision=bf16: the transformer runs under autocast (its output differs from fp32 by bf16
    rounding), velocities reach the sampler as float32, and the on-policy first ratio is still exactly 1."""
    from flowrl.trainer import Trainer, make_epoch

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "a", eval_base=False)
    full = Trainer(cfg)
    cfg16 = _small_cfg(tiny_sd3_path, tmp_path / "b", eval_base=False, mixed_precision="bf16")
    half = Trainer(cfg16)
    eb = make_epoch(cfg, full.train_md, 0, 0, 1)
    cond = full.adapter.encode(eb.prompts[:4])
    x = torch.randn(4, *full.adapter.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    s = torch.full((4,), 0.7)
    v32 = full.adapter.velocity(x, s, cond, 4.5)
    v16 = half.adapter.velocity(x, s, cond, 4.5)
    assert v16.dtype == torch.float32
    rel = (v16 - v32).norm() / v32.norm()
    assert 1e-5 < rel < 5e-2
    batch = half.collect(0)
    assert half.update(batch["traj"], batch["cond"], batch["adv"])["first_ratio_max_dev"] == 0.0
    cfg16.trainer.mixed_precision = "fp8"
    with pytest.raises(ConfigError, match="mixed_precision"):
        validate(cfg16)


def _script(*overrides, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_flowgrpo.py"), *overrides],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_script_startup_errors_are_clear(tmp_path):
    p = _script("model.lora_rnk=3")
    assert p.returncode != 0 and "lora_rnk" in p.stderr
    p = _script("model.pretrained=assets/no-such-model", f"trainer.output_dir={tmp_path}/a")
    assert p.returncode == 2 and "model_index.json" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    p = _script(f"data.train={bad}", f"trainer.output_dir={tmp_path}/b")
    assert p.returncode == 2 and "bad.jsonl:1" in p.stderr
    p = _script("trainer.group_size=3", "trainer.micro_batch=16", f"trainer.output_dir={tmp_path}/c")
    assert p.returncode == 2 and "micro_batch" in p.stderr


def test_update_moves_log_probs_in_the_advantage_direction(tiny_sd3_path, tmp_path):
    """After one optimizer step, Σ_i A_i·(logp_new - logp_old) > 0 over the trained steps (policy improvement)."""
    from flowrl.trainer import Trainer, make_epoch

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", lr=1e-3)
    cfg.algorithm.kl_beta = 0.0
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, cond, cols, _ = tr.rollout(eb, 0)
    adv = torch.linspace(-1, 1, len(eb.prompts))[torch.randperm(len(eb.prompts), generator=torch.Generator().manual_seed(0))]
    tr.update(traj, cond, adv)
    gain = 0.0
    with torch.no_grad():
        for t in torch.nonzero(traj.train_mask.any(0)).flatten().tolist():
            v = tr.adapter.velocity(traj.latents[:, t], tr.sigmas[t].expand(len(adv)), cond, cfg.sampler.guidance_scale)
            out = tr.step_fn(traj.latents[:, t], v, tr.sigmas[t], tr.sigmas[t + 1], traj.noise_levels[:, t],
                             prev_sample=traj.latents[:, t + 1])
            gain += float((adv * (out.log_prob - traj.log_probs[:, t])).sum())
    assert gain > 0


def test_dynamic_sampling_keeps_only_informative_groups(tiny_sd3_path, tmp_path, monkeypatch):
    """Groups whose rewards are all equal are dropped and refilled from further rollout rounds (DAPO)."""
    from flowrl.trainer import Trainer

    _register_reward(tmp_path, monkeypatch, "half_const", "half_const_reward", "HalfConst",
        "import zlib\n"
        "import numpy as np\n"
        "class HalfConst:\n"
        "    name = 'half'\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        # prompts with an even CRC get a constant reward (no spread), the others the image's mean pixel\n"
        "        r = [0.5 if zlib.crc32(p.encode()) % 2 == 0 else float(im.mean()) / 255\n"
        "             for im, p in zip(images, prompts)]\n"
        "        return {'reward': np.asarray(r, dtype=np.float32)}\n")
    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False, groups_per_epoch=4)
    cfg.reward.name = "half_const"
    cfg.algorithm.dynamic_sampling, cfg.algorithm.dynamic_sampling_max_rounds = True, 4
    tr = Trainer(cfg)
    for epoch in range(3):
        batch = tr.collect(epoch)
        n_kept = len(batch["adv"])
        assert batch["groups"] <= cfg.trainer.groups_per_epoch and n_kept == batch["groups"] * cfg.trainer.group_size
        assert batch["traj"].latents.shape[0] == n_kept and batch["cond"].pooled.shape[0] == n_kept
        assert (batch["adv"].view(-1, cfg.trainer.group_size).abs().sum(1) > 0).all()  # every kept group has signal
        assert len(batch["rewards_all"]) == batch["rounds"] * 16
        frac = batch["informative_frac"]
        assert 0 <= frac <= 1
        if frac < 1:  # round 0 had dead groups: more rounds were rolled out (up to the limit) to refill
            assert batch["rounds"] > 1 or batch["groups"] == cfg.trainer.groups_per_epoch
    stats = tr.update(batch["traj"], batch["cond"], batch["adv"])
    assert stats["first_ratio_max_dev"] == 0.0


def test_gdpo_multi_reward_collect(tiny_sd3_path, tmp_path):
    """reward=multi with aggregation=gdpo: components are gathered, advantages are batch-normalised GDPO ones."""
    from flowrl.core.multi_reward import gdpo_advantages
    from flowrl.trainer import Trainer

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.reward.name, cfg.reward.aggregation = "multi", "gdpo"
    cfg.reward.args = {"components": {"jpeg_compressibility": 1.0, "jpeg_incompressibility": {"weight": 0.5}}}
    tr = Trainer(cfg)
    batch = tr.collect(0)
    cols = batch["cols"]
    assert {"jpeg_compressibility", "jpeg_incompressibility", "reward"} <= set(cols)
    g = torch.arange(len(batch["adv"])) // cfg.trainer.group_size
    ref = gdpo_advantages({k: torch.as_tensor(cols[k]) for k in ("jpeg_compressibility", "jpeg_incompressibility")},
                          {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}, g, "grpo",
                          cfg.algorithm.advantage_eps, cfg.algorithm.advantage_clip)
    torch.testing.assert_close(batch["adv"], ref)
    cfg2 = _small_cfg(tiny_sd3_path, tmp_path / "run2")
    cfg2.reward.aggregation = "gdpo"
    with pytest.raises(ConfigError, match="reward=multi"):
        validate(cfg2)


def test_resume_reproduces_an_uninterrupted_run(tiny_sd3_path, tmp_path):
    """3 epochs straight == 2 epochs, then a new process-equivalent Trainer resuming (`resume=auto`) for the third."""
    from flowrl.trainer import Trainer

    straight = Trainer(_small_cfg(tiny_sd3_path, tmp_path / "a", epochs=3, eval_base=False, eval_max_prompts=1))
    res_a = straight.run()
    first = Trainer(_small_cfg(tiny_sd3_path, tmp_path / "b", epochs=2, eval_base=False, eval_max_prompts=1))
    first.run()
    second = Trainer(_small_cfg(tiny_sd3_path, tmp_path / "b", epochs=3, eval_base=False, eval_max_prompts=1,
                                resume="auto"))
    assert torch.load(second.find_checkpoint("auto") / "trainer_state.pt", weights_only=False)["epoch"] == 1
    res_b = second.run()
    for p, q in zip(straight.params, second.params):
        assert torch.equal(p, q)
    for s, t in zip(straight.ema.shadow, second.ema.shadow):
        assert torch.equal(s, t)
    assert [h["reward/mean"] for h in res_a["history"]] == [h["reward/mean"] for h in res_b["history"]]
    assert len(res_b["history"]) == 3
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        second.find_checkpoint(str(tmp_path / "nowhere"))


def test_raising_reward_stops_after_a_checkpoint_that_resumes(tiny_sd3_path, tmp_path, monkeypatch):
    from flowrl.trainer import Trainer

    _register_reward(tmp_path, monkeypatch, "flaky_test", "flaky_reward_mod", "Flaky",
        "import numpy as np\n"
        "class Flaky:\n"
        "    name = 'flaky'\n"
        "    calls = 0\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        Flaky.calls += 1\n"
        "        if Flaky.calls > 2:\n"
        "            raise TimeoutError('reward backend timed out')\n"
        "        return {'reward': images.reshape(len(images), -1).mean(1) / 255.0}\n")
    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False, epochs=3)
    cfg.reward.name = "flaky_test"
    tr = Trainer(cfg)
    with pytest.raises(RuntimeError, match="TimeoutError: reward backend timed out") as e:
        tr.run()  # 2 micro-batches per epoch: epoch 0 succeeds, epoch 1 fails
    ckpt = tmp_path / "run" / "checkpoints" / "error_epoch_0001"
    assert str(ckpt) in str(e.value) and "trainer.resume=" in str(e.value)
    st = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert st["epoch"] == 0 and len(st["history"]) == 1
    auto = tr.find_checkpoint("auto")  # epoch_0001 (save_every=1) and error_epoch_0001 both end at epoch 0
    assert torch.load(auto / "trainer_state.pt", weights_only=False)["epoch"] == 0


def test_shared_initial_noise_branches_groups_at_the_sde_window(tiny_sd3_path, tmp_path):
    """With one x_T per group and ODE steps before the window, a group's samples coincide up to the window."""
    from flowrl.trainer import Trainer, make_epoch

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.sampler.sde_window, cfg.sampler.window_start_min, cfg.sampler.window_start_max = 1, 1, 2
    cfg.sampler.shared_initial_noise = True
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, _, _, _ = tr.rollout(eb, 0)
    g = cfg.trainer.group_size
    lat = traj.latents  # [n, T+1, ...]; window = step 1 only: states 0 and 1 shared, state 2 branches
    for k in range(0, len(eb.prompts), g):
        grp = lat[k : k + g]
        assert torch.equal(grp[:, 0], grp[:1, 0].expand_as(grp[:, 0]))
        assert torch.allclose(grp[:, 1], grp[:1, 1].expand_as(grp[:, 1]), atol=1e-6)
        assert (grp[1:, 2] - grp[:1, 2]).abs().amax() > 1e-3
    assert not torch.equal(lat[0, 0], lat[g, 0])  # different groups, different x_T
    assert traj.train_mask[:, 1].all() and not traj.train_mask[:, 0].any() and not traj.train_mask[:, 2:].any()


def test_nft_update_pulls_positive_and_pushes_negative_samples(tiny_sd3_path, tmp_path):
    """DiffusionNFT on ODE rollouts: after one on-policy step the flow-matching error of high-advantage samples falls
    relative to low-advantage ones (same forward-process draws)."""
    from flowrl.trainer import NFT_SEED_OFFSET, Trainer, make_epoch, sample_seed

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False, lr=3e-3)
    cfg.algorithm.name, cfg.algorithm.kl_beta, cfg.algorithm.nft_timesteps = "nft", 0.0, 2
    cfg.sampler.noise_level = 0.0
    validate(cfg)
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, cond, _, _ = tr.rollout(eb, 0)
    assert not traj.train_mask.any()  # ODE rollouts: nothing for a likelihood ratio
    n = len(eb.prompts)
    adv = torch.tensor([2.5, -2.5] * (n // 2))

    def errors():
        out = []
        with torch.no_grad():
            for i, sid in enumerate(eb.sample_ids):
                g = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, 0, NFT_SEED_OFFSET + sid))
                u = torch.sigmoid(torch.randn(2, generator=g))
                sig = 3.0 * u / (1 + 2.0 * u)
                eps = torch.randn((2, *traj.final.shape[1:]), generator=g)
                x0 = traj.final[i : i + 1].expand(2, *traj.final.shape[1:])
                xt = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * eps
                v = tr.adapter.velocity(xt, sig, cond[[i, i]], 1.0)
                out.append(float((v - (eps - x0)).pow(2).mean()))
        return torch.tensor(out)

    before = errors()
    stats = tr.update_nft(traj, cond, adv, eb.sample_ids, 0)
    after = errors()
    d = after - before
    assert d[adv > 0].mean() < d[adv < 0].mean()
    assert 0 < stats["r"] < 1 and stats["nft_loss"] > 0
    cfg.algorithm.kl_beta = 0.1
    with pytest.raises(ConfigError, match="kl_beta=0"):
        validate(cfg)


@pytest.mark.parametrize("shared", [False, True])
def test_raft_update_is_flow_matching_on_above_mean_samples(tiny_sd3_path, tmp_path, shared):
    """algorithm=raft: the update's gradient equals the gradient of the mean flow-matching error over the
    (sample, draw) pairs of samples with A > 0 only; with nft_shared_draws a group shares its (σ, ε) draws."""
    from flowrl.trainer import NFT_SEED_OFFSET, Trainer, forward_process_draws, make_epoch, sample_seed

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.algorithm.name, cfg.algorithm.kl_beta, cfg.algorithm.nft_timesteps = "raft", 0.0, 2
    cfg.algorithm.nft_shared_draws, cfg.algorithm.nft_guidance_scale = shared, 2.0
    cfg.sampler.noise_level = 0.0
    validate(cfg)
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, cond, _, _ = tr.rollout(eb, 0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 2.0, -0.2, -0.3])
    tr._optimizer_step = lambda: None
    tr.update_nft(traj, cond, adv, eb.sample_ids, 0)
    got = [p.grad.clone() for p in tr.params]
    for p in tr.params:
        p.grad = None
    g = cfg.trainer.group_size
    terms = []
    for i, sid in enumerate(eb.sample_ids):
        key = sid // g if shared else sid
        sig, eps = forward_process_draws(torch.Generator().manual_seed(
            sample_seed(cfg.trainer.seed, 0, NFT_SEED_OFFSET + key)), 2, tuple(traj.final.shape[1:]))
        if shared and i % g:
            assert torch.equal(sig, first_sig)
        if i % g == 0:
            first_sig = sig
        if adv[i] <= 0:
            continue
        x0 = traj.final[i : i + 1].expand(2, *traj.final.shape[1:])
        xt = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * eps
        v = tr.adapter.velocity(xt, sig, cond[[i, i]], 2.0)
        terms.append((v - (eps - x0)).pow(2).flatten(1).mean(1))
    torch.cat(terms).mean().backward()
    for a, p in zip(got, tr.params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-9)


def test_zero_advantage_samples_are_skipped_without_changing_the_update(tiny_sd3_path, tmp_path):
    """β = 0: skipping zero-advantage samples leaves the gradient identical (the normaliser still counts them)."""
    from flowrl.trainer import Trainer, make_epoch

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.algorithm.kl_beta = 0.0
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, cond, _, _ = tr.rollout(eb, 0)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, 0.0, -0.5, 0.0])
    tr._optimizer_step = lambda: None  # keep the accumulated gradient for inspection
    tr.update(traj, cond, adv)
    skipped = [p.grad.clone() for p in tr.params]
    for p in tr.params:
        p.grad = None
    cfg.algorithm.kl_beta = 1e-30  # a KL term too small to matter disables the skip: every sample runs
    tr.update(traj, cond, adv)
    for g, p in zip(skipped, tr.params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-8)  # batch composition changes rounding only


@pytest.mark.parametrize("loss", ["gspo", "gmpo"])
def test_sequence_level_loss_update_matches_the_full_trajectory_gradient(tiny_sd3_path, tmp_path, loss):
    """GSPO/GMPO in the trainer (per-step backward passes, random trained-step subsets) give the gradient of
    (1/B)·Σ_i L_i computed on whole trajectories in one graph, also off-policy (after an optimizer step)."""
    from flowrl.core import aggregate_loss, get_policy_loss
    from flowrl.trainer import Trainer, make_epoch

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False, lr=3e-3)
    a = cfg.algorithm
    a.kl_beta, a.policy_loss, a.loss_aggregation, a.inner_epochs = 0.0, loss, "seq_mean_step_mean", 2
    a.clip_range = a.clip_range_high = 0.05 if loss == "gspo" else 0.02
    cfg.sampler.steps_per_sample = 2
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, cond, _, _ = tr.rollout(eb, 0)
    adv = torch.tensor([1.0, -1.0, 0.3, -0.2, 0.5, 0.8, -0.5, -1.2])
    real_step, grads = tr._optimizer_step, []

    def capture():
        if not hasattr(capture, "n"):
            capture.n = 0
        capture.n += 1
        if capture.n == 1:
            real_step()
        else:
            grads.extend(p.grad.clone() for p in tr.params)

    tr._optimizer_step = capture
    tr.update(traj, cond, adv)
    assert capture.n == 2 and grads
    for p in tr.params:
        p.grad = None
    m = traj.train_mask
    lp = torch.zeros_like(traj.log_probs)
    for t in range(m.shape[1]):
        if m[:, t].any():
            v = tr.adapter.velocity(traj.latents[:, t], tr.sigmas[t].expand(len(adv)), cond, cfg.sampler.guidance_scale)
            out = tr.step_fn(traj.latents[:, t], v, tr.sigmas[t], tr.sigmas[t + 1], traj.noise_levels[:, t],
                             prev_sample=traj.latents[:, t + 1])
            lp = lp + torch.where(m[:, t : t + 1] & (torch.arange(m.shape[1]) == t), out.log_prob[:, None], 0.0)
    pl = get_policy_loss(loss)(lp, traj.log_probs, adv, m, a.clip_range, a.clip_range_high)
    ratio = pl.extra.get("seq_ratio", pl.ratio)
    assert (ratio[m] - 1).abs().max() > 1e-4  # off-policy: the sequence ratio is not 1
    aggregate_loss(pl.loss, m, "seq_mean_step_mean", normaliser=len(adv)).backward()
    for g, p in zip(grads, tr.params):
        torch.testing.assert_close(g, p.grad, rtol=2e-4, atol=1e-9)


def test_grpo_guard_reweights_each_step_by_std_over_step_size(tiny_sd3_path, tmp_path):
    """On-policy GRPO-Guard in the trainer: the gradient is Σ_it -A_i·(s_t/|Δ_t|)·∇logp_it / (trained pairs)."""
    from flowrl.trainer import Trainer, make_epoch

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.algorithm.kl_beta, cfg.algorithm.policy_loss = 0.0, "grpo_guard"
    tr = Trainer(cfg)
    eb = make_epoch(cfg, tr.train_md, 0, 0, 1)
    traj, cond, _, _ = tr.rollout(eb, 0)
    adv = torch.tensor([1.0, -1.0, 0.3, -0.2, 0.5, 0.8, -0.5, -1.2])
    tr._optimizer_step = lambda: None
    tr.update(traj, cond, adv)
    got = [p.grad.clone() for p in tr.params]
    for p in tr.params:
        p.grad = None
    m = traj.train_mask
    total, weights = 0.0, []
    for t in range(m.shape[1]):
        if not m[:, t].any():
            continue
        v = tr.adapter.velocity(traj.latents[:, t], tr.sigmas[t].expand(len(adv)), cond, cfg.sampler.guidance_scale)
        out = tr.step_fn(traj.latents[:, t], v, tr.sigmas[t], tr.sigmas[t + 1], traj.noise_levels[:, t],
                         prev_sample=traj.latents[:, t + 1])
        w = out.std / (tr.sigmas[t] - tr.sigmas[t + 1])
        weights.append(float(w.mean()))
        total = total + (-adv * w * out.log_prob * m[:, t]).sum()
    (total / m.sum()).backward()
    assert weights[0] > 3 * weights[-1]  # early, high-noise steps are up-weighted
    for g, p in zip(got, tr.params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-9)
    cfg.algorithm.inner_epochs = 2
    with pytest.raises(ConfigError, match="on-policy"):
        validate(cfg)


def test_nft_guided_field_through_the_conditional_branch_only(tiny_sd3_path, tmp_path):
    """nft_detach_uncond: the trained field has the CFG value v_u + g·(v_c - v_u), but its gradient is g times the
    conditional branch's; nft_uncond_anchor adds ‖v_u - v_u^ref‖², 0 at the LoRA's zero init and > 0 once it moved."""
    from flowrl.trainer import Trainer

    cfg = _small_cfg(tiny_sd3_path, tmp_path / "run", eval_base=False)
    cfg.algorithm.name, cfg.algorithm.kl_beta, cfg.algorithm.nft_guidance_scale = "nft", 0.0, 3.0
    cfg.algorithm.nft_detach_uncond = True
    cfg.sampler.noise_level = 0.0
    validate(cfg)
    tr = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the LoRA off its zero init so every branch has a gradient and a drift
        for p in tr.params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cond = tr.adapter.encode(["a photo of a red circle", "a photo of two blue stars"])
    res = cfg.model.resolution
    x = torch.randn((2, *tr.adapter.latent_shape(res, res)), generator=g)
    s = torch.tensor([0.3, 0.8])
    w = torch.randn(x.shape, generator=g)
    u, drift = tr._guided_velocity_split(x, s, cond)
    assert drift is None
    with torch.no_grad():
        torch.testing.assert_close(u, tr.adapter.velocity(x, s, cond, 3.0), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad((u * w).sum(), tr.params, allow_unused=True)
    want = torch.autograd.grad((3.0 * tr.adapter.velocity(x, s, cond, 1.0) * w).sum(), tr.params, allow_unused=True)
    assert sum(float(a.abs().sum()) for a in got if a is not None) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    cfg.algorithm.nft_uncond_anchor = 1.0
    _, drift = tr._guided_velocity_split(x, s, cond)
    with torch.no_grad():
        neg = tr.adapter.negative(2)
        v_u = tr.adapter.velocity(x, s, neg, 1.0)
        with tr.adapter.reference():
            v_ref = tr.adapter.velocity(x, s, neg, 1.0)
    torch.testing.assert_close(drift.detach(), (v_u - v_ref).pow(2).flatten(1).mean(1))
    assert float(drift.detach().min()) > 0 and drift.requires_grad
    cfg.algorithm.nft_guidance_scale = 1.0
    with pytest.raises(ConfigError, match="nft_guidance_scale > 1"):
        validate(cfg)


def test_progress_bar_shows_the_figures_of_each_update_rule():
    from flowrl.trainer import progress_postfix

    log = {"reward/mean": 0.5, "train/kl": 0.0, "train/clipfrac": 0.0, "train/nft_loss": 0.1234,
           "train/draft_loss": -0.5, "train/dpo_loss": 0.69, "train/dpo_implicit_acc": 0.5}
    assert progress_postfix("flow_grpo", log) == {"reward": "0.500", "kl": "0.00e+00", "clip": "0.00"}
    assert progress_postfix("nft", log) == {"reward": "0.500", "loss": "0.1234"}
    assert progress_postfix("draft", log) == {"reward": "0.500", "loss": "-0.5000"}
    assert progress_postfix("dpo", {k: v for k, v in log.items() if k != "reward/mean"}) == {"dpo": "0.6900",
                                                                                              "acc": "0.50"}
    assert progress_postfix("rpo", {"rpo/harmonic": 0.4}) == {"harmonic": "0.400"}
