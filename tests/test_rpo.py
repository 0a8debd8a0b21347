"""RPO (``algorithm=rpo``, flowrl/rpo.py): the λ-Harmonic reward, the preference labels, the update, early stopping,
the start-up refusals and a 2-epoch run through ``Trainer.run``.

Tiny random SD3 pipeline (conftest) and a tiny random CLIP (the builder of test_model_rewards.py), both loaded through
their real ``from_pretrained`` paths, offline; the subject and its prompts are written by scripts/make_rpo_example.py's
functions into a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flowrl.config import ConfigError, validate
from flowrl.core.dpo import LOG2
from flowrl.rpo import (EarlyStopping, LambdaHarmonic, RPO_LABEL_OFFSET, RPO_SEED_OFFSET, draw_preference_labels,
                        find_reference_images, lambda_harmonic, map_similarity, strip_subject_token)
from test_config_and_training import _compose, _small_cfg
from test_model_rewards import _build, _hand

ROOT = Path(__file__).resolve().parents[1]


def _example_module():
    spec = importlib.util.spec_from_file_location("make_rpo_example", ROOT / "scripts" / "make_rpo_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return str(_build(tmp_path_factory.mktemp("rpo_clip") / "clip", seed=0))


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> tuple[Path, Path]:
    """(reference folder with 4 PNGs, prompt file with train/val splits) of the example subject."""
    d = tmp_path_factory.mktemp("rpo_subject")
    ex = _example_module()
    ex.render_references(d / "refs")
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ex.subject_records()))
    return d / "refs", d / "prompts.jsonl"


# -- the λ-Harmonic reward ---------------------------------------------------------------------------------------------
def test_lambda_harmonic_formula_on_known_values():
    assert lambda_harmonic(0.5, 0.25, 0.3) == pytest.approx(1 / (0.3 / 0.5 + 0.7 / 0.25))  # = 1/3.4
    assert lambda_harmonic(0.8, 0.2, 0.5) == pytest.approx(2 * 0.8 * 0.2 / (0.8 + 0.2))  # λ=½: plain harmonic mean
    # endpoints: λ = 1 is the image similarity, λ = 0 the text similarity, and the formula tends to them
    assert lambda_harmonic(0.7, 0.3, 1.0) == 0.7 and lambda_harmonic(0.7, 0.3, 0.0) == 0.3
    assert lambda_harmonic(0.7, 0.3, 1 - 1e-9) == pytest.approx(0.7, abs=1e-8)
    assert lambda_harmonic(0.7, 0.3, 1e-9) == pytest.approx(0.3, abs=1e-8)
    # equal similarities give that similarity for every λ
    for lam in (0.0, 0.1, 0.3, 0.9, 1.0):
        assert lambda_harmonic(0.42, 0.42, lam) == pytest.approx(0.42)
    # a zero similarity with a positive weight gives 0; with zero weight it is ignored
    assert lambda_harmonic(0.0, 0.9, 0.3) == 0.0 and lambda_harmonic(0.9, 0.0, 0.3) == 0.0
    assert lambda_harmonic(0.0, 0.9, 0.0) == 0.9 and lambda_harmonic(0.9, 0.0, 1.0) == 0.9
    assert lambda_harmonic(0.0, 0.0, 0.5) == 0.0
    # below both similarities' max and above their min; arrays broadcast
    r = lambda_harmonic(np.array([0.2, 0.9, 1.0]), np.array([0.6, 0.1, 1.0]), 0.3)
    assert r.shape == (3,) and r.dtype == np.float64
    np.testing.assert_allclose(r, [1 / (0.3 / 0.2 + 0.7 / 0.6), 1 / (0.3 / 0.9 + 0.7 / 0.1), 1.0])
    for bad in ((0.5, 0.5, 1.5), (0.5, 0.5, -0.1), (-0.1, 0.5, 0.3), (0.5, 1.2, 0.3), (float("nan"), 0.5, 0.3)):
        with pytest.raises(ValueError):
            lambda_harmonic(*bad)


def test_similarity_mapping_and_subject_token():
    np.testing.assert_allclose(map_similarity([-0.5, 0.0, 0.3, 1.0]), [0.0, 0.0, 0.3, 1.0])
    np.testing.assert_allclose(map_similarity([-1.0, 0.0, 0.5], "affine"), [0.0, 0.5, 0.75])
    torch.testing.assert_close(map_similarity(torch.tensor([-0.2, 0.4])), torch.tensor([0.0, 0.4]))
    with pytest.raises(ValueError, match="mapping"):
        map_similarity(0.1, "sigmoid")
    assert strip_subject_token("a photo of a sks star left of a blue circle", "sks") == \
        "a photo of a star left of a blue circle"
    assert strip_subject_token("sks star", "sks") == "star"
    assert strip_subject_token("a photo of a sksy star", "sks") == "a photo of a sksy star"  # whole words only


def test_reference_images_are_found_or_refused(subject, tmp_path):
    refs, _ = subject
    files = find_reference_images(refs)
    assert [f.name for f in files] == [f"ref_{i}.png" for i in range(4)]
    assert find_reference_images(str(refs / "ref_[01].png")) == files[:2]
    assert find_reference_images(files[3]) == [files[3]]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    for spec in (tmp_path / "empty", tmp_path / "missing", str(tmp_path / "*.png")):
        with pytest.raises(FileNotFoundError, match="no reference images found"):
            find_reference_images(spec)


def test_plugin_columns_match_a_hand_computation(clip_dir, subject):
    refs, _ = subject
    from PIL import Image

    from flowrl.rewards import load_reward

    ref_u8 = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in find_reference_images(refs)])
    g = np.random.default_rng(0)
    images = np.concatenate([ref_u8[:2], g.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)])
    prompts = ["a photo of a sks star", "a photo of a sks star left of a blue circle", "a photo of a red square",
               "a photo of a sks star"]
    stripped = [strip_subject_token(p, "sks") for p in prompts]
    img, txt, _, _ = _hand(Path(clip_dir), images, stripped)
    ref_emb, _, _, _ = _hand(Path(clip_dir), ref_u8, [])
    cos_img, cos_txt = (img @ ref_emb.T).mean(1), (img * txt).sum(1)
    for mapping in ("clamp", "affine"):
        fn = load_reward("lambda_harmonic", references=str(refs), model=clip_dir, lam=0.3, mapping=mapping,
                         device="cpu")
        assert isinstance(fn, LambdaHarmonic) and len(fn.reference_paths) == 4
        out = fn(images, prompts, None)
        assert set(out) == {"reward", "s_img", "s_txt"}
        for v in out.values():
            assert v.shape == (4,) and v.dtype == np.float32 and (v >= 0).all() and (v <= 1).all()
        np.testing.assert_allclose(out["s_img"], map_similarity(cos_img, mapping), atol=1e-5)
        np.testing.assert_allclose(out["s_txt"], map_similarity(cos_txt, mapping), atol=1e-5)
        np.testing.assert_allclose(out["reward"], lambda_harmonic(out["s_img"], out["s_txt"], 0.3), atol=1e-6)
    # the token is removed before text encoding: "a photo of a sks star" scores as "a photo of a star"
    plain = fn(images[:1], ["a photo of a star"], None)
    assert plain["s_txt"][0] == pytest.approx(out["s_txt"][0], abs=1e-6)
    assert fn(images[:0], [], None)["reward"].shape == (0,)


def test_plugin_refuses_a_missing_clip_and_bad_arguments(subject, clip_dir, tmp_path):
    refs, _ = subject
    with pytest.raises(FileNotFoundError, match="pretrain_clip.py"):
        LambdaHarmonic(references=str(refs), model=str(tmp_path / "no_clip_here"))
    with pytest.raises(FileNotFoundError, match="no reference images"):
        LambdaHarmonic(references=str(tmp_path / "none"), model=clip_dir)
    with pytest.raises(ValueError, match="lam"):
        LambdaHarmonic(references=str(refs), model=clip_dir, lam=1.5)


# -- the preference labels ---------------------------------------------------------------------------------------------
def test_preference_labels_follow_the_bradley_terry_rule():
    """y = [u < σ(R_ref - R_gen)] with u ~ U(0, 1) from the pair's own seed (documented in flowrl/rpo.py)."""
    n = 4000
    seeds = list(range(10_000, 10_000 + n))
    labels, probs = draw_preference_labels(np.full(n, 0.9), np.full(n, 0.1), seeds)
    assert labels.dtype == torch.bool and probs.shape == (n,)
    assert float(probs[0]) == pytest.approx(1 / (1 + math.exp(-0.8)))
    assert abs(labels.float().mean().item() - float(probs[0])) < 0.03  # 0.69 ± 3σ
    u = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(s))) for s in seeds[:50]])
    assert torch.equal(labels[:50], u < probs[0].double())
    # a pair's label depends only on its seed (not on the other pairs or the batching)
    sub, _ = draw_preference_labels(np.full(7, 0.9), np.full(7, 0.1), seeds[100:107])
    assert torch.equal(sub, labels[100:107])
    # equal rewards: a fair coin; huge gaps: certain
    fair, p = draw_preference_labels(np.zeros(n), np.zeros(n), seeds)
    assert float(p[0]) == 0.5 and abs(fair.float().mean().item() - 0.5) < 0.03
    assert draw_preference_labels([40.0] * 5, [0.0] * 5, seeds[:5])[0].all()
    assert not draw_preference_labels([0.0] * 5, [40.0] * 5, seeds[:5])[0].any()
    with pytest.raises(ValueError):
        draw_preference_labels([0.1, 0.2], [0.3], seeds[:2])
    with pytest.raises(ValueError):
        draw_preference_labels([float("nan")], [0.3], seeds[:1])


# -- early stopping --------------------------------------------------------------------------------------------------
def test_early_stopping_counts_evaluations_without_improvement():
    es = EarlyStopping(patience=2)
    seen = []
    for epoch, score in enumerate([0.1, 0.3, 0.3, 0.4, 0.2, 0.39, 0.5]):
        seen.append(es.update(score, epoch))
        if es.should_stop:
            break
    # 0.3 again is not an improvement (strictly greater needed); 0.4 resets the count; 0.2 and 0.39 stop it
    assert seen == [True, True, False, True, False, False]
    assert es.best == 0.4 and es.best_epoch == 3 and es.bad == 2 and epoch == 5
    other = EarlyStopping(patience=2)
    other.load_state_dict(es.state_dict(), before_epoch=4)  # a run resumed at epoch 4 re-does epochs 4, 5
    assert other.best == 0.4 and other.bad == 0 and len(other.evals) == 4 and not other.should_stop
    other.load_state_dict(es.state_dict())
    assert other.should_stop and other.best_epoch == 3
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError):
        es.update(float("nan"), 9)


# -- the update --------------------------------------------------------------------------------------------------------
def _rpo_cfg(model, clip_dir, subject, out, **algo):
    refs, prompts = subject
    cfg = _small_cfg(model, out, eval_base=False, lr=1e-2, ema=False)
    cfg.algorithm = OmegaConf.to_object(_compose(["algorithm=rpo"])).algorithm
    a = cfg.algorithm
    a.rpo_references, a.rpo_prompts, a.rpo_eval_every = str(refs), str(prompts), 100
    for k, v in algo.items():
        setattr(a, k, v)
    cfg.reward.name = "lambda_harmonic"
    cfg.reward.args = {"model": clip_dir, "references": str(refs), "lam": a.rpo_lambda, "subject_token": "sks",
                       "mapping": "affine", "device": "cpu"}
    cfg.model.lora_rank, cfg.model.lora_alpha = 4, 8.0
    cfg.data.test = str(prompts)
    t = cfg.trainer
    t.group_size, t.groups_per_epoch, t.micro_batch, t.optimizer_steps_per_epoch = 2, 2, 4, 1
    cfg.sampler.kind, cfg.sampler.noise_level = "cps", 0.0  # sampler=ode
    validate(cfg)
    return cfg


def _capture_steps(tr):
    grads = []

    def capture():
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.params])
        tr.opt.zero_grad(set_to_none=True)

    tr._optimizer_step = capture
    return grads


def test_first_step_loss_is_log2_plus_recon_and_only_the_lora_gets_gradients(tiny_sd3_path, clip_dir, subject,
                                                                             tmp_path):
    from flowrl.trainer import Trainer, forward_process_draws, make_epoch, sample_seed

    w = 0.5
    cfg = _rpo_cfg(tiny_sd3_path, clip_dir, subject, tmp_path / "run", rpo_recon_weight=w)
    tr = Trainer(cfg)
    ad, rpo = tr.adapter, tr.rpo
    grads = _capture_steps(tr)  # no step is applied: every micro-batch sees policy = reference (LoRA B = 0)
    stats, images = rpo.update(0)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8 and len(grads) == 1
    assert stats["train/rpo_pref_loss"] == pytest.approx(LOG2, abs=1e-6)
    assert stats["train/rpo_loss"] == pytest.approx(LOG2 + w * stats["train/rpo_recon_loss"], abs=1e-6)
    assert stats["train/rpo_first_loss"] == pytest.approx(LOG2 + w * stats["train/rpo_recon_loss"], rel=0.5)
    assert stats["train/rpo_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # the reconstruction term, recomputed by hand: the base model's flow-matching error on reference i mod K,
    # conditioned on the instance prompt, at the pair's own (σ, ε)
    eb = make_epoch(cfg, rpo.train_md, 0, 0, 1)
    errs = []
    with torch.no_grad(), ad.reference():
        for sid in eb.sample_ids:
            x0 = rpo.ref_latents[sid % 4 : sid % 4 + 1]
            g = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, 0, RPO_SEED_OFFSET + sid))
            sig, eps = forward_process_draws(g, 1, tuple(x0.shape[1:]))
            x_t = (1 - sig) * x0 + sig * eps
            v = ad.velocity(x_t, sig, ad.encode([cfg.algorithm.rpo_instance_prompt]), 1.0)
            errs.append(float((v - (eps - x0)).pow(2).mean()))
    assert stats["train/rpo_recon_loss"] == pytest.approx(float(np.mean(errs)), rel=1e-4)
    # gradients: on the LoRA only (B receives them at B = 0), nothing else
    names = [n for n, p in ad.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == len(tr.params)
    assert sum(float(gr.abs().sum()) for gr in grads[0]) > 0
    assert any(float(gr.abs().sum()) > 0 for n, gr in zip(names, grads[0]) if "lora_B" in n)
    frozen = [p for n, p in ad.transformer.named_parameters() if "lora_" not in n]
    for module in (ad.pipeline.vae, ad.pipeline.text_encoder, ad.pipeline.text_encoder_2, tr.reward_fn.embedder.model):
        frozen += list(module.parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    for key in ("reward/mean", "reward/s_img", "reward/s_txt", "train/rpo_ref_preferred", "train/rpo_pref_prob"):
        assert math.isfinite(stats[key]), key


@pytest.mark.parametrize("label_lambda", [None, 0.0])
def test_pairs_and_labels_follow_the_documented_rule(tiny_sd3_path, clip_dir, subject, tmp_path, label_lambda):
    from flowrl.trainer import Trainer, make_epoch, sample_seed

    cfg = _rpo_cfg(tiny_sd3_path, clip_dir, subject, tmp_path / "run", rpo_label_lambda=label_lambda)
    cfg.trainer.group_size, cfg.trainer.groups_per_epoch = 4, 2
    tr = Trainer(cfg)
    rpo, fn = tr.rpo, tr.reward_fn
    eb = make_epoch(cfg, rpo.train_md, 3, 0, 1)
    _, _, cols, images = tr.rollout(eb, 3)
    p = rpo.pairs(eb, cols, 3)
    k = torch.tensor(eb.sample_ids) % 4
    assert torch.equal(p["ref_index"], k)
    ref = fn(rpo.ref_u8[k.numpy()], eb.prompts, None)  # the reference scored against the generated image's prompt
    lam = 0.3 if label_lambda is None else label_lambda
    np.testing.assert_allclose(p["r_ref"].numpy(), lambda_harmonic(ref["s_img"], ref["s_txt"], lam), atol=1e-6)
    np.testing.assert_allclose(p["r_gen"].numpy(), lambda_harmonic(cols["s_img"], cols["s_txt"], lam), atol=1e-6)
    if label_lambda == 0.0:  # λ = 0 (the official script's training labels): text similarity only
        np.testing.assert_allclose(p["r_gen"].numpy(), cols["s_txt"], atol=1e-6)
    np.testing.assert_allclose(cols["reward"], lambda_harmonic(cols["s_img"], cols["s_txt"], 0.3), atol=1e-6)
    probs = torch.sigmoid(p["r_ref"] - p["r_gen"])
    u = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(
        sample_seed(cfg.trainer.seed, 3, RPO_LABEL_OFFSET + s)))) for s in eb.sample_ids], dtype=torch.float64)
    assert torch.equal(p["labels"], u < probs)
    torch.testing.assert_close(p["probs"], probs.float())
    # the reference's own image similarity is high: it is one of the references (cosine 1 with itself)
    assert (ref["s_img"] > cols["s_img"].min() - 1e-6).all()


def test_micro_batching_does_not_change_the_gradient(tiny_sd3_path, clip_dir, subject, tmp_path):
    from flowrl.trainer import Trainer

    cfg = _rpo_cfg(tiny_sd3_path, clip_dir, subject, tmp_path / "run")
    tr = Trainer(cfg)
    grads = _capture_steps(tr)
    stats = []
    for mb in (4, 2):
        tr.cfg.trainer.micro_batch = mb
        stats.append(tr.rpo.update(0)[0])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert stats[0]["train/rpo_loss"] == pytest.approx(stats[1]["train/rpo_loss"], abs=1e-6)
    assert stats[0]["train/rpo_ref_preferred"] == stats[1]["train/rpo_ref_preferred"]


def test_early_stopping_stops_after_patience_and_keeps_the_best_checkpoint(tiny_sd3_path, clip_dir, subject,
                                                                           tmp_path, monkeypatch):
    from flowrl.rpo import RPOUpdater
    from flowrl.trainer import Trainer

    cfg = _rpo_cfg(tiny_sd3_path, clip_dir, subject, tmp_path / "run", rpo_eval_every=1, rpo_patience=2)
    cfg.trainer.epochs, cfg.trainer.save_every, cfg.trainer.eval_every = 8, 0, 0
    scripted = iter([0.10, 0.20, 0.50, 0.40, 0.45, 0.90])  # base, then epochs 0, 1, 2, 3 (stop), never reached
    snapshots = {}

    def fake_scores(self, base=False, label=None):
        h = next(scripted)
        if not base:
            snapshots[len(snapshots)] = [p.detach().clone() for p in self.tr.params]
        return {"harmonic": h, "s_img": h, "s_txt": h}

    monkeypatch.setattr(RPOUpdater, "validation_scores", fake_scores)
    tr = Trainer(cfg)
    res = tr.run()
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]  # stopped after 2 evaluations without improvement
    assert [h["rpo/harmonic"] for h in hist] == [0.20, 0.50, 0.40, 0.45]
    assert hist[0]["rpo/harmonic_base"] == 0.10 and "rpo/harmonic_base" not in hist[1]
    assert [h["rpo/bad_evals"] for h in hist] == [0, 0, 1, 2] and hist[-1]["rpo/best_harmonic"] == 0.50
    best = torch.load(tmp_path / "run" / "checkpoints" / "best" / "trainer_state.pt", weights_only=False)
    assert best["epoch"] == 1  # the best evaluation's weights, not the last ones
    for a, b in zip(best["params"], snapshots[1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(best["params"], tr.params))
    state = json.loads((tmp_path / "run" / "rpo_state.json").read_text())
    assert state["best"] == 0.5 and state["best_epoch"] == 1 and state["bad"] == 2 and len(state["evals"]) == 4
    assert (tmp_path / "run" / "checkpoints" / "final" / "lora").is_dir()


# -- refusals ----------------------------------------------------------------------------------------------------------
def _cfg(subject, *overrides):
    refs, prompts = subject
    return OmegaConf.to_object(_compose(["algorithm=rpo", "reward=lambda_harmonic", f"algorithm.rpo_references={refs}",
                                         f"algorithm.rpo_prompts={prompts}", *overrides]))


def test_valid_rpo_configs_validate(subject):
    validate(_cfg(subject))
    validate(_cfg(subject, "sampler=ode", "algorithm.rpo_label_lambda=0", "trainer.group_size=1",
                  "trainer.micro_batch=8"))
    validate(_cfg(subject, f"algorithm.rpo_references={subject[0]}/*.png"))


@pytest.mark.parametrize("overrides,needles", [
    (["algorithm.rpo_references=/no/such/folder"], ["no reference images found", "rpo_references='/no/such/folder'",
                                                    "make_rpo_example.py"]),
    (["algorithm.rpo_lambda=0"], ["algorithm.rpo_lambda=0", "(0, 1)"]),
    (["algorithm.rpo_lambda=1"], ["algorithm.rpo_lambda=1", "(0, 1)"]),
    (["algorithm.rpo_lambda=1.5"], ["algorithm.rpo_lambda=1.5", "(0, 1)"]),
    (["algorithm.rpo_label_lambda=-0.5"], ["rpo_label_lambda=-0.5", "[0, 1]"]),
    (["reward=geneval_shapes"], ["λ-Harmonic reward model", "reward=geneval_shapes", "set reward=lambda_harmonic"]),
    (["reward.args.model=null"], ["has no reward model", "reward.args.model"]),
    (["reward.args.lam=0.5"], ["reward.args.lam=0.5 contradicts algorithm.rpo_lambda=0.3"]),
    (["algorithm.rpo_patience=0"], ["algorithm.rpo_patience=0", "≥ 1"]),
    (["algorithm.rpo_patience=-2"], ["algorithm.rpo_patience=-2"]),
    (["algorithm.rpo_eval_every=0"], ["algorithm.rpo_eval_every=0"]),
    (["algorithm.rpo_val_images=0"], ["algorithm.rpo_val_images=0"]),
    (["algorithm.rpo_prompts=/no/such.jsonl"], ["algorithm.rpo_prompts", "make_rpo_example.py"]),
    (["algorithm.rpo_instance_prompt=a photo of a star"], ["must contain the subject token 'sks'"]),
    (["algorithm.rpo_recon_weight=-1"], ["rpo_recon_weight=-1"]),
    (["algorithm.dpo_beta=0"], ["dpo_beta=0"]),
    (["algorithm.kl_beta=0.04"], ["set algorithm.kl_beta=0"]),
])
def test_rpo_refusals_name_the_fix(subject, overrides, needles):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(subject, *overrides))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_prompt_file_without_a_val_split_is_refused(subject, tmp_path):
    refs, prompts = subject
    lines = [json.loads(x) for x in prompts.read_text().splitlines()]
    (tmp_path / "train_only.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if r["split"] == "train"))
    with pytest.raises(ConfigError, match="needs 'train' prompts .* and 'val' prompts"):
        validate(_cfg(subject, f"algorithm.rpo_prompts={tmp_path / 'train_only.jsonl'}"))


def test_trainer_refuses_a_missing_clip_and_a_foreign_reward(tiny_sd3_path, clip_dir, subject, tmp_path,
                                                             monkeypatch):
    import flowrl.trainer as trainer_mod
    from flowrl.trainer import Trainer

    cfg = _rpo_cfg(tiny_sd3_path, clip_dir, subject, tmp_path / "run")
    cfg.reward.args = {**cfg.reward.args, "model": str(tmp_path / "shapes-clip")}
    with pytest.raises(FileNotFoundError, match="scripts/pretrain_clip.py"):
        Trainer(cfg)
    cfg = _rpo_cfg(tiny_sd3_path, clip_dir, subject, tmp_path / "run")
    real = trainer_mod.load_reward
    monkeypatch.setattr(trainer_mod, "load_reward", lambda name, **kw: real("geneval_shapes"))
    with pytest.raises(ConfigError, match="reward=lambda_harmonic"):
        Trainer(cfg)


# -- 2-epoch smoke run through Trainer.run -----------------------------------------------------------------------------
def test_two_epoch_rpo_run_logs_validates_and_checkpoints(tiny_sd3_path, clip_dir, subject, tmp_path):
    from flowrl.trainer import Trainer

    refs, prompts = subject
    cfg = OmegaConf.to_object(_compose([
        f"model.pretrained={tiny_sd3_path}", "algorithm=rpo", "reward=lambda_harmonic", "sampler=ode",
        f"reward.args.model={clip_dir}", "+reward.args.device=cpu", f"algorithm.rpo_references={refs}",
        f"algorithm.rpo_prompts={prompts}", f"data.test={prompts}", "model.lora_rank=4", "model.lora_alpha=8",
        "algorithm.rpo_val_images=1"]))
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
        for key in ("reward/mean", "reward/s_img", "reward/s_txt", "train/rpo_loss", "train/rpo_pref_loss",
                    "train/rpo_recon_loss", "train/rpo_ref_preferred", "train/grad_norm", "rpo/harmonic",
                    "rpo/s_img", "rpo/s_txt", "rpo/best_harmonic"):
            assert key in h and math.isfinite(h[key]), key
        assert 0 <= h["rpo/harmonic"] <= 1 and 0 <= h["reward/mean"] <= 1
    assert 0 <= res["history"][0]["rpo/harmonic_base"] <= 1
    assert res["history"][0]["train/rpo_first_loss"] == pytest.approx(
        LOG2 + res["history"][0]["train/rpo_recon_loss"], rel=0.5)
    assert any((a - b).abs().max() > 0 for a, b in zip(tr.params, before))
    out = tmp_path / "run"
    assert (out / "checkpoints" / "best" / "lora").is_dir() and (out / "checkpoints" / "final" / "lora").is_dir()
    assert (out / "rpo" / "base.png").is_file() and (out / "rpo" / "val_epoch_0001.png").is_file()
    assert (out / "images" / "epoch_0001.png").is_file() and (out / "rpo_state.json").is_file()
    assert {"reward", "s_img", "s_txt"} <= set(res["trained"]) and "reward" in res["base"]
