"""Side by side with TRL: flowrl's VLM GRPO branch against TRL's ``GRPOTrainer`` on the embedded tiny Qwen2-VL.

    python scripts/benchmark_trl.py parity                                   # (a) loss on identical inputs
    python scripts/benchmark_trl.py train --framework flowrl --steps 30 --seed 0   # (b)+(c) one training run
    python scripts/benchmark_trl.py train --framework trl --steps 30 --seed 0
    python scripts/benchmark_trl.py base                                     # held-out accuracy of the start model
    python scripts/benchmark_trl.py profile                                  # where a flowrl step's time goes
    python scripts/benchmark_trl.py report          # docs/trl_comparison.{md,json} from runs/trl_comparison/*.json

Needs ``trl`` and ``datasets``, which are not flowrl dependencies (``pip install datasets`` then
``pip install --no-deps trl==1.16.0``; see docs/trl_comparison.md). Run with ``OMP_NUM_THREADS=1``.

(a) **Loss on identical inputs.** One batch (chat prompts + images, ``G`` completions per question sampled by
:class:`~flowrl.text.policy.VLMPolicy`, completion masks, perturbed old log-probs so that the clip is active,
advantages) is built once; the loss is then computed by TRL's own ``GRPOTrainer._compute_loss`` (its fused LM-head
log-probs, clip, KL and normaliser for ``loss_type``) and by flowrl's path (``VLMPolicy.token_log_probs`` → a
:data:`flowrl.core.POLICY_LOSSES` loss → :func:`flowrl.core.aggregate_loss` with the global normaliser the VLM trainer
uses), on the same model object. The flowrl side is configured from ``configs/vlm/algorithm/<name>.yaml``. Both the
single-batch loss and a two-micro-batch accumulation (TRL with ``gradient_accumulation_steps = steps_per_generation
= 2``; flowrl with its global normaliser) are compared, and the gradients of the single-batch losses.

TRL scores completions with the *full* temperature softmax, while flowrl's sampling/scoring distribution removes the
vision special tokens (``VLMPolicy.banned``). The exact comparison therefore uses flowrl's scoring with an empty
banned list (the same distribution); the "as shipped" numbers (vision tokens suppressed) are reported next to it.

(b)/(c) **Training.** ``train`` runs ``--steps`` optimizer steps of one framework with the same model, data,
group size, prompts per step, completion length, temperature, learning rate, AdamW settings, gradient clipping,
reward (``vqa_accuracy``) and loss (GRPO: PPO clip 0.2, per-sequence token mean, no KL), on one thread, timing every
step (generation + scoring, and the update), then evaluates greedy held-out accuracy with
:func:`flowrl.text.evaluation.evaluate_policy` on the first ``--eval-records`` test records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "trl_comparison"

# TRL loss types with a flowrl counterpart. ``algorithm`` names configs/vlm/algorithm/<name>.yaml (clip ranges, policy
# loss, aggregation); ``flowrl`` overrides it where flowrl has no such preset. ``scale`` is the size of the
# perturbation of the old log-probs (a sequence-level ratio needs a smaller one to sit near GSPO's tiny clip range).
MATCHES = [
    dict(name="grpo", loss_type="grpo", algorithm="grpo", scale=0.3),
    dict(name="bnpo", loss_type="bnpo", algorithm="grpo", flowrl=dict(loss_aggregation="step_mean"), scale=0.3,
         accumulation_match=False,
         note="TRL normalises by the tokens of the local micro-batch; flowrl's step_mean by the tokens of the whole "
              "optimizer step, so they agree without gradient accumulation and differ with it"),
    dict(name="dapo", loss_type="dapo", algorithm="dapo", scale=0.3),
    dict(name="dr_grpo", loss_type="dr_grpo", algorithm="dr_grpo", scale=0.3),
    dict(name="gspo (grpo, sequence-level IS)", loss_type="grpo", importance_sampling_level="sequence",
         algorithm="gspo", scale=2e-3),
    dict(name="luspo", loss_type="luspo", importance_sampling_level="sequence", algorithm="gspo",
         flowrl=dict(loss_aggregation="seq_mean_step_sum"), scale=2e-3),
    dict(name="grpo + k3 KL (beta 0.04, no KL IS weight)", loss_type="grpo", algorithm="grpo", beta=0.04,
         trl_args=dict(use_bias_correction_kl=False), flowrl=dict(kl_beta=0.04, kl_estimator="k3"), scale=0.3),
    dict(name="grpo + k3 KL (beta 0.04, TRL default)", loss_type="grpo", algorithm="grpo", beta=0.04,
         flowrl=dict(kl_beta=0.04, kl_estimator="k3"), scale=0.3, expect_match=False,
         note="TRL >= 1.x multiplies the k3 KL term by the (differentiable) importance ratio by default "
              "(GRPOConfig.use_bias_correction_kl=True, DeepSeek-V3.2); flowrl's k3 KL has no such weight, so the "
              "value differs off-policy and the KL gradient differs even on-policy. With "
              "use_bias_correction_kl=False the two agree"),
]
# TRL loss types without a flowrl counterpart (and why).
UNMATCHED = {
    "cispo": "clips the detached importance weight and multiplies log-probs (MiniMax-M1); flowrl has no such loss",
    "sapo": "soft sigmoid gate instead of a clip (SAPO); flowrl has no such loss",
    "vespo": "Gamma-weighted sequence ratios (VESPO); flowrl has no such loss",
}



NOTES = """
## What TRL implements (read from the installed `trl/trainer/grpo_trainer.py`, 1.16.0) and how it maps to flowrl

| | TRL `GRPOTrainer` | flowrl (`flowrl.text` + `flowrl.core`) |
|---|---|---|
| per-token log-probs | fused LM head (`add_fused_lm_head`): log-softmax of `logits / temperature` over the **full** vocabulary, float32 on CPU | `VLMPolicy.token_log_probs`: log-softmax of `logits / T` in float32 with the four vision special tokens set to −∞ (the sampling distribution) |
| sampling | `generate(do_sample, temperature, top_k, top_p)`, suppresses only `<\\|image_pad\\|>` by default | `generate(temperature, top_k=0, top_p=1)` with all four vision tokens suppressed; the benchmark passes the same list to TRL via `generation_kwargs.suppress_tokens` |
| ratio | `exp(logp − old)` per token (`importance_sampling_level="token"`), or `exp` of the masked mean log-ratio per sequence (`"sequence"`, GSPO) | `ppo_clip_loss` per token; `gspo_loss` per sequence |
| clip | `−min(ρA, clamp(ρ, 1−epsilon, 1+epsilon_high)·A)`, `epsilon_high` defaults to `epsilon` | `max(−ρA, −clip(ρ, 1−ε_low, 1+ε_high)·A)` (the same) |
| `grpo` | per-sequence token mean, mean over the local batch, ÷ accumulation steps | `seq_mean_step_mean`, normaliser = samples of the optimizer step |
| `bnpo` | token sum ÷ tokens of the **local micro-batch**, ÷ accumulation steps | `step_mean` divides by the tokens of the whole optimizer step: equal without accumulation only |
| `dapo` (TRL's default) | token sum ÷ (`num_items_in_batch` = tokens of the generation batch over all ranks) ÷ processes × accumulation ÷ `steps_per_generation` | `step_mean` with the global token count (flowrl `algorithm=dapo`, ε 0.2/0.28; its dynamic sampling is a rollout feature, not part of the loss, and TRL's `GRPOTrainer` has none) |
| `dr_grpo` | token sum ÷ (local batch × `max_completion_length`) ÷ accumulation steps | `constant`, normaliser = samples × `max_new_tokens` |
| `luspo` | per-sequence token sum of the sequence-level loss, mean over sequences | `gspo_loss` + `seq_mean_step_sum` |
| KL (`beta` > 0) | k3 `exp(ref−logp) − (ref−logp) − 1` added per token before aggregation; **multiplied by the ratio by default** (`use_bias_correction_kl=True`) | `kl_beta` × `aggregate_loss(k3)` with the same aggregation; no ratio weight |
| `beta` default | 0.0 (no reference model) | `kl_beta: 0.0` in every VLM algorithm preset except `reinforce_pp` |
| old log-probs on-policy | not computed (`num_iterations=1`, `steps_per_generation == gradient_accumulation_steps`): `logp.detach()` | computed at rollout (one extra no-grad forward), ratio exactly 1 |
| advantages | `(r − mean_g) / (std_g + 1e-4)`, **Bessel-corrected** std (`nanstd`) | `(r − mean_g) / (std_g + 1e-4)`, population std |
| `cispo`, `sapo`, `vespo` | implemented | no counterpart (not compared) |

Remaining differences, none of which affects (a): the advantage std (TRL's is √(G/(G−1)) larger, so its advantages are
≈ 0.935× flowrl's for G = 8; the update direction is the same and AdamW is nearly invariant to the scale), the prompt
order (TRL's `RepeatSampler` shuffle vs flowrl's per-epoch seeded draw from the same 10 000 records) and the random
streams of sampling; and flowrl renormalises the scoring softmax without the vision tokens while TRL does not (for the
embedded, trained model those tokens carry at most a few 1e-6 of probability, see the log-prob line of (a); for
random weights ≈ 1 %, which moves the gradient by ≈ 1 %).

## Installing TRL here

TRL 1.16.0 requires `accelerate>=1.10.1`, `transformers>=4.56.2`, `datasets>=4.7.0`, `pandas`, `pyarrow>=21`, all
compatible with the pinned torch 2.13 CPU / transformers 5.23 / accelerate 1.15. Only `datasets` was missing:

    pip install datasets==5.2.0        # + pyarrow, pandas, dill, multiprocess, xxhash; torch/transformers untouched
    pip install --no-deps trl==1.16.0

`pip check` reports nothing new (only the pre-existing `open-clip-torch` → `timm`/`torchvision` notes). TRL's own
`vlm` extra asks for torchvision, which is not needed: the processor is flowrl's `load_processor` (image-only
Qwen2-VL processor). TRL is not a flowrl dependency; as an optional extra in `pyproject.toml` it would read
`trl = ["trl==1.16.0", "datasets>=4.7"]` (pinned: the parity test calls TRL's private `_compute_loss`,
`_get_per_token_logps_and_entropies` and `_tokenize_prompts`).

The wall-clock numbers were measured on a 2-core machine shared with other training jobs whose number varied during
the measurement (each process here used one thread); flowrl and TRL ran one after the other, alternating per seed, so
compare the per-seed medians with that noise in mind (a few tenths of a second per step).
"""

def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("flowrl", "trl", "torch", "transformers", "accelerate", "datasets", "peft"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def algorithm_config(name: str) -> dict:
    """``configs/vlm/algorithm/<name>.yaml`` merged into the defaults of
    :class:`~flowrl.text.config.VLMAlgorithmConfig`."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from flowrl.text.config import VLMAlgorithmConfig

    cfg = asdict(VLMAlgorithmConfig())
    cfg.update(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "vlm" / "algorithm" / f"{name}.yaml")))
    return cfg


def freeze_vision(model) -> None:
    """Freeze the vision tower (flowrl's ``model.freeze_vision: true``), so both frameworks train the same
    parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_(".visual." not in f".{n}")


def vqa_accuracy(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: flowrl's ``vqa_accuracy`` (``flowrl_rewards.vqa.VQAAccuracy``) on the decoded completions
    (conversational completions are ``[{"role": "assistant", "content": text}]``) against the ``answer`` column."""
    from flowrl_rewards.vqa import VQAAccuracy

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    out = VQAAccuracy()([t.strip() for t in texts], None, [{"answer": a} for a in answer])
    return [float(x) for x in out["reward"]]


def trl_dataset(records: list[dict]):
    """A ``datasets.Dataset`` of conversational prompts, the rendered image and the reference answer (TRL's format)."""
    from datasets import Dataset
    from PIL import Image

    from flowrl.text.trainer import render_images

    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "image": Image.fromarray(im),
             "answer": r["answer"], "tag": r.get("tag", "")} for r, im in zip(records, render_images(records))]
    return Dataset.from_list(rows)


def trl_config(output_dir: str | Path, *, loss_type: str = "grpo", epsilon: float = 0.2,
               epsilon_high: float | None = None, importance_sampling_level: str = "token", beta: float = 0.0,
               num_generations: int = 8, batch: int = 128, max_completion_length: int = 32,
               temperature: float = 1.0, lr: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 0.0,
               grad_clip: float = 1.0, steps: int = 1, seed: int = 0, suppress_tokens: list[int] | None = None):
    """A ``GRPOConfig`` with flowrl's conventions: CPU float32, no gradient checkpointing, one optimizer step per
    generation batch, constant learning rate, plain ``torch.optim.AdamW``, sampling with ``top_k = 0``, ``top_p = 1``
    and the vision special tokens suppressed (TRL's default suppresses only ``<|image_pad|>``)."""
    from trl import GRPOConfig

    gen = {"suppress_tokens": list(suppress_tokens)} if suppress_tokens else None
    return GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high,
        importance_sampling_level=importance_sampling_level, beta=beta, scale_rewards="group",
        num_generations=num_generations, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, temperature=temperature, top_k=0, top_p=1.0,
        repetition_penalty=1.0, generation_kwargs=gen, learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1], adam_epsilon=1e-8,
        optim="adamw_torch", max_grad_norm=grad_clip, max_steps=steps, seed=seed, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)


# ------------------------------------------------------------------------------------------------------------------
# (a) loss on identical inputs
# ------------------------------------------------------------------------------------------------------------------

def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _grads(params) -> "torch.Tensor":
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).clone()


def loss_parity(model_path: str | Path, records: list[dict], *, group_size: int = 4, max_new_tokens: int = 32,
                temperature: float = 1.0, seed: int = 0, work_dir: str | Path | None = None) -> dict:
    """Compare TRL's and flowrl's loss on one batch built once (see the module docstring).

    Args:
        model_path: a saved Qwen2-VL folder (loaded afresh for every TRL loss type, as TRL patches the model's
            forward). records: VQA records; each is asked ``group_size`` times.
        max_new_tokens, temperature: sampling / scoring settings shared by both (TRL's ``max_completion_length``,
            ``temperature``). seed: sampling, perturbation and advantages.

    Returns:
        ``{"settings", "prompt_tokens_identical", "pixel_values_identical", "log_probs", "rows", "unmatched"}``; each
        row has ``trl_loss``, ``flowrl_loss``, ``abs_diff``, ``rel_diff``, ``grad_rel_diff``, ``accumulated`` (two
        micro-batches) and ``shipped`` (flowrl with the vision tokens suppressed, scoring its own old / reference
        log-probs with the same perturbations).
    """
    import tempfile

    import torch
    from PIL import Image
    from trl import GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from flowrl.core import KL_ESTIMATORS, POLICY_LOSSES, aggregate_loss
    from flowrl.text.policy import VLMPolicy
    from flowrl.text.trainer import load_vlm, render_images

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="trl_parity_"))
    recs = [r for r in records for _ in range(group_size)]
    images = render_images(recs)
    questions = [r["question"] for r in recs]
    B, L = len(recs), int(max_new_tokens)

    # -- the batch, built once -----------------------------------------------------------------------------------
    model, processor = load_vlm(str(model_path))
    model.eval()
    policy = VLMPolicy(model, processor, temperature=temperature, max_new_tokens=L)
    banned = list(policy.banned)
    inputs = policy.prompt_inputs(images, questions)
    comp = policy.generate(inputs, seed=seed)
    ids, mask = comp.ids, comp.mask
    g = torch.Generator().manual_seed(seed + 1)
    delta = torch.rand(ids.shape, generator=g) * 2 - 1  # U(-1, 1), scaled per loss type
    ref_shift = (torch.rand(ids.shape, generator=g) * 2 - 1) * 0.5
    advantages = torch.randn(B, generator=g)
    with torch.no_grad():
        lp_shipped = policy.token_log_probs(inputs, ids, mask)
        policy.banned = []  # TRL's scoring distribution: the full temperature softmax
        lp_full = policy.token_log_probs(inputs, ids, mask)
        policy.banned = banned
    del model

    def trl_inputs(rows: slice, old, ref=None):
        mm = inputs.get("mm_token_type_ids")
        per_img = inputs["image_grid_thw"].prod(-1)
        start = int(per_img[: rows.start or 0].sum())
        stop = int(per_img[: rows.stop if rows.stop is not None else B].sum())
        out = {"prompt_ids": inputs["input_ids"][rows], "prompt_mask": inputs["attention_mask"][rows],
               "completion_ids": ids[rows], "completion_mask": mask[rows].long(), "advantages": advantages[rows],
               "old_per_token_logps": old[rows], "pixel_values": inputs["pixel_values"][start:stop],
               "image_grid_thw": inputs["image_grid_thw"][rows], "num_images": [1] * len(range(B)[rows]),
               "num_items_in_batch": mask.sum()}  # the generation batch's tokens (TRL gathers it over ranks)
        if mm is not None:
            out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(ids)], 1)[rows]
        if ref is not None:
            out["ref_per_token_logps"] = ref[rows]
        return out

    result = {"settings": {"records": len(records), "group_size": group_size, "completions": B,
                           "max_new_tokens": L, "temperature": temperature, "seed": seed,
                           "completion_tokens": int(mask.sum()), "completion_width": int(ids.shape[1]),
                           "truncated": int(comp.truncated.sum()), "banned_vision_tokens": banned},
              "rows": [], "unmatched": UNMATCHED}
    halves = [slice(0, B // 2), slice(B // 2, B)]
    for spec in MATCHES:
        algo = algorithm_config(spec["algorithm"])
        algo.update(spec.get("flowrl", {}))
        eps, eps_high = float(algo["clip_range"]), algo["clip_range_high"]
        model, _ = load_vlm(str(model_path))
        freeze_vision(model)
        trainer = GRPOTrainer(
            model=model, reward_funcs=vqa_accuracy, processing_class=processor,
            train_dataset=trl_dataset(records[:1] * group_size),
            args=trl_config(work_dir / spec["loss_type"], loss_type=spec["loss_type"], epsilon=eps,
                            epsilon_high=None if eps_high is None else float(eps_high),
                            importance_sampling_level=spec.get("importance_sampling_level", "token"),
                            num_generations=group_size, batch=B, max_completion_length=L, temperature=temperature,
                            suppress_tokens=banned))
        # The loss of a TRL ``loss_type`` with ``beta`` > 0 only reads ``ref_per_token_logps``; setting the
        # coefficient after construction avoids loading a second copy of the model for the reference.
        trainer.beta = float(spec.get("beta", 0.0))
        for k, v in spec.get("trl_args", {}).items():
            setattr(trainer.args, k, v)
        params = [p for p in model.parameters() if p.requires_grad]
        old = lp_full + spec["scale"] * delta * mask
        ref = (lp_full + ref_shift * mask) if trainer.beta else None
        if not result.get("prompt_tokens_identical"):  # TRL's own prompt tokenisation of the same chat + image
            msgs = [prepare_multimodal_messages([{"role": "user", "content": q}], images=[Image.fromarray(im)])
                    for q, im in zip(questions, images)]
            trl_ids, _, trl_mm = trainer._tokenize_prompts(msgs)
            ours = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
            result["prompt_tokens_identical"] = [list(x) for x in trl_ids] == ours
            result["pixel_values_identical"] = bool(torch.equal(torch.as_tensor(trl_mm["pixel_values"]),
                                                                inputs["pixel_values"]))
            with torch.no_grad():
                full = trl_inputs(slice(0, B), old)
                trl_lp, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, torch.cat([full["prompt_ids"], ids], 1),
                    torch.cat([full["prompt_mask"], full["completion_mask"]], 1), ids.shape[1],
                    pixel_values=full["pixel_values"], image_grid_thw=full["image_grid_thw"],
                    num_images=full["num_images"], mm_token_type_ids=full.get("mm_token_type_ids"))
            m = mask.bool()
            result["log_probs"] = {
                "max_abs_diff_trl_vs_flowrl_unsuppressed": float((trl_lp - lp_full)[m].abs().max()),
                "max_abs_diff_trl_vs_flowrl_shipped": float((trl_lp - lp_shipped)[m].abs().max()),
                "mean_abs_diff_trl_vs_flowrl_shipped": float((trl_lp - lp_shipped)[m].abs().mean()),
                "note": "flowrl as shipped renormalises over the vocabulary without the vision special tokens; the "
                        "difference is -log(1 - p(vision tokens)) per token"}

        def trl_loss(rows: slice, accumulation: int):
            model.train()  # TRL trains in train mode (the tiny model has no dropout)
            trainer.current_gradient_accumulation_steps = accumulation
            trainer.args.steps_per_generation = accumulation
            return trainer._compute_loss(model, trl_inputs(rows, old, ref))

        def flowrl_loss(rows: slice, lp_banned: list[int], old_lp, ref_lp):
            model.eval()
            pol = VLMPolicy(model, processor, temperature=temperature, max_new_tokens=L)
            pol.banned = lp_banned
            sub = {k: v[rows] if k not in ("pixel_values",) else v for k, v in inputs.items()}
            per_img = inputs["image_grid_thw"].prod(-1)
            sub["pixel_values"] = inputs["pixel_values"][int(per_img[: rows.start or 0].sum()):
                                                         int(per_img[: rows.stop].sum())]
            lp = pol.token_log_probs(sub, ids[rows], mask[rows])
            fn = POLICY_LOSSES[algo["policy_loss"]]
            out = fn(lp, old_lp[rows], advantages[rows], mask[rows], eps, eps_high)
            mode = algo["loss_aggregation"]
            # the VLM trainer's global normaliser over the whole optimizer step (VLMTrainer._normaliser)
            norm = {"step_mean": float(mask.sum()), "constant": float(B * L)}.get(mode, float(B))
            loss = aggregate_loss(out.loss, mask[rows], mode, norm)
            scale = aggregate_loss(out.loss.detach().abs(), mask[rows], mode, norm)
            if algo["kl_beta"] > 0:
                kl = KL_ESTIMATORS[algo["kl_estimator"]](lp, ref_lp[rows])
                loss = loss + algo["kl_beta"] * aggregate_loss(kl, mask[rows], mode, norm)
                scale = scale + algo["kl_beta"] * aggregate_loss(kl.detach().abs(), mask[rows], mode, norm)
            scales.append(float(scale))
            return loss

        scales: list[float] = []
        model.zero_grad(set_to_none=True)
        lt = trl_loss(slice(0, B), 1)
        lt.backward()
        g_trl = _grads(params)
        model.zero_grad(set_to_none=True)
        lf = flowrl_loss(slice(0, B), [], old, ref)
        lf.backward()
        g_flowrl = _grads(params)
        model.zero_grad(set_to_none=True)
        # as shipped: flowrl's own scoring (vision tokens suppressed) for the current, old and reference log-probs,
        # with the same perturbations, i.e. what each framework sees when it scores its own rollouts
        old_shipped = lp_shipped + spec["scale"] * delta * mask
        ref_shipped = (lp_shipped + ref_shift * mask) if trainer.beta else None
        ls = flowrl_loss(slice(0, B), banned, old_shipped, ref_shipped)
        ls.backward()
        g_shipped = _grads(params)
        model.zero_grad(set_to_none=True)
        shipped = float(ls.detach())
        with torch.no_grad():
            acc_t = sum(float(trl_loss(h, 2)) for h in halves)
            acc_f = sum(float(flowrl_loss(h, [], old, ref)) for h in halves)
        lt_v, lf_v = float(lt.detach()), float(lf.detach())
        row = {"name": spec["name"],
               "trl": {"loss_type": spec["loss_type"], "epsilon": trainer.epsilon_low,
                       "epsilon_high": trainer.epsilon_high,
                       "importance_sampling_level": trainer.importance_sampling_level, "beta": trainer.beta},
               "flowrl": {"algorithm": spec["algorithm"], "policy_loss": algo["policy_loss"],
                          "clip_range": eps, "clip_range_high": eps_high,
                          "loss_aggregation": algo["loss_aggregation"], "kl_beta": algo["kl_beta"]},
               "old_logp_perturbation": spec["scale"],
               "trl_loss": lt_v, "flowrl_loss": lf_v, "abs_diff": abs(lt_v - lf_v),
               "rel_diff": _rel(lt_v, lf_v),
               # |diff| relative to the same aggregation of |per-token loss|: a loss that is a sum of terms of both
               # signs can be near 0, which inflates the plain relative difference of two float32 results
               "loss_scale": scales[0], "scaled_diff": abs(lt_v - lf_v) / max(scales[0], 1e-30),
               "expect_match": spec.get("expect_match", True),
               "grad_rel_diff": float((g_trl - g_flowrl).norm() / g_trl.norm().clamp_min(1e-30)),
               "grad_norm": float(g_trl.norm()),
               "accumulated": {"micro_batches": 2, "tokens": [int(mask[h].sum()) for h in halves], "trl": acc_t,
                               "flowrl": acc_f, "abs_diff": abs(acc_t - acc_f), "rel_diff": _rel(acc_t, acc_f),
                               "scaled_diff": abs(acc_t - acc_f) / max(scales[2] + scales[3], 1e-30),
                               "expect_match": spec.get("accumulation_match", spec.get("expect_match", True))},
               "shipped": {"flowrl_loss": shipped, "abs_diff": abs(lt_v - shipped),
                           "rel_diff": _rel(lt_v, shipped), "scaled_diff": abs(lt_v - shipped) / max(scales[1], 1e-30),
                           "grad_rel_diff": float((g_trl - g_shipped).norm() / g_trl.norm().clamp_min(1e-30))},
               "note": spec.get("note", "")}
        result["rows"].append(row)
        del trainer, model
    return result


# ------------------------------------------------------------------------------------------------------------------
# (b) + (c) training runs
# ------------------------------------------------------------------------------------------------------------------

def train_flowrl(args) -> dict:
    """``--steps`` epochs of :class:`~flowrl.text.trainer.VLMTrainer` (algorithm grpo, reward vqa_accuracy),
    timing the rollout (sampling + old log-probs + reward + advantages) and the update of each step."""
    import torch

    from flowrl.text.config import VLMAlgorithmConfig, VLMRewardConfig, VLMTrainConfig
    from flowrl.text.trainer import VLMTrainer

    cfg = VLMTrainConfig()
    cfg.model.pretrained, cfg.model.max_new_tokens = args.model, args.max_new_tokens
    cfg.model.temperature = args.temperature
    cfg.algorithm = VLMAlgorithmConfig(**algorithm_config("grpo"))
    cfg.reward = VLMRewardConfig(name="vqa_accuracy", args={})
    cfg.data.train, cfg.data.test = args.train_data, args.test_data
    t = cfg.trainer
    t.seed, t.epochs, t.group_size, t.groups_per_epoch = args.seed, args.steps, args.group_size, args.groups
    t.micro_batch, t.lr, t.betas, t.grad_clip = args.group_size * args.groups, args.lr, [0.9, 0.999], 1.0
    t.eval_base, t.threads = False, args.threads
    cfg.model.freeze_vision = not args.train_vision
    t.output_dir = str(Path(args.out) / f"flowrl_seed{args.seed}")
    trainer = VLMTrainer(cfg)
    steps = []
    for epoch in range(args.steps):
        t0 = time.perf_counter()
        batch = trainer.collect(epoch)
        t1 = time.perf_counter()
        stats = trainer.update(batch["samples"])
        t2 = time.perf_counter()
        steps.append({"step": epoch + 1, "total_s": t2 - t0, "generation_s": t1 - t0, "update_s": t2 - t1,
                      "reward": float(batch["rewards_all"].mean()), "policy_loss": stats.get("policy_loss"),
                      "completion_tokens": float(sum(len(s["ids"]) for s in batch["samples"]) /
                                                 len(batch["samples"]))})
        print(f"flowrl step {epoch + 1}: {t2 - t0:.2f}s (gen {t1 - t0:.2f}s) reward {steps[-1]['reward']:.3f}",
              flush=True)
    trainer.model.eval()
    return {"steps": steps, "model": trainer.model, "processor": trainer.policy.processor}


def train_trl(args) -> dict:
    """``--steps`` optimizer steps of TRL's ``GRPOTrainer`` (loss_type grpo, beta 0, the wrapped vqa_accuracy
    reward), timing each step (callback) and its generation + scoring (``_generate_and_score_completions``)."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from flowrl.text.policy import VLMPolicy
    from flowrl.text.trainer import check_records, load_vlm
    from flowrl.text.vqa import read_jsonl

    records = read_jsonl(args.train_data)
    check_records(records, args.train_data)
    model, processor = load_vlm(args.model)
    if not args.train_vision:
        freeze_vision(model)
    banned = VLMPolicy(model, processor).banned
    timing: dict[str, list[float]] = {"generation_s": [], "total_s": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timing["generation_s"].append(time.perf_counter() - t0)
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            timing["total_s"].append(time.perf_counter() - self.t0)

    algo = algorithm_config("grpo")
    out_dir = Path(args.out) / f"trl_seed{args.seed}"
    t_data = time.perf_counter()
    ds = trl_dataset(records)
    data_s = time.perf_counter() - t_data
    trainer = Timed(model=model, reward_funcs=vqa_accuracy, processing_class=processor, train_dataset=ds,
                    callbacks=[StepClock()],
                    args=trl_config(out_dir, loss_type="grpo", epsilon=float(algo["clip_range"]),
                                    num_generations=args.group_size, batch=args.group_size * args.groups,
                                    max_completion_length=args.max_new_tokens, temperature=args.temperature,
                                    lr=args.lr, steps=args.steps, seed=args.seed, suppress_tokens=banned))
    torch.set_num_threads(args.threads)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = []
    for i, tot in enumerate(timing["total_s"]):
        gen = timing["generation_s"][i] if i < len(timing["generation_s"]) else float("nan")
        h = logs[i] if i < len(logs) else {}
        steps.append({"step": i + 1, "total_s": tot, "generation_s": gen, "update_s": tot - gen,
                      "reward": h.get("reward"), "policy_loss": h.get("loss"),
                      "completion_tokens": h.get("completions/mean_length")})
        print(f"trl step {i + 1}: {tot:.2f}s (gen {gen:.2f}s) reward {h.get('reward')}", flush=True)
    model.eval()
    return {"steps": steps, "model": model, "processor": processor, "dataset_build_s": data_s}


def evaluate(model, processor, args) -> dict:
    from flowrl.text.evaluation import evaluate_policy
    from flowrl.text.policy import VLMPolicy
    from flowrl.text.vqa import read_jsonl

    records = read_jsonl(args.test_data)[: args.eval_records]
    policy = VLMPolicy(model.eval(), processor, temperature=1.0, max_new_tokens=args.max_new_tokens)
    return evaluate_policy(policy, records, batch=100)["summary"]


def _summary(values: list[float]) -> dict:
    vals = [v for v in values if v == v]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def cmd_train(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = train_flowrl(args) if args.framework == "flowrl" else train_trl(args)
    t0 = time.perf_counter()
    summary = evaluate(run["model"], run["processor"], args)
    steps = run["steps"]
    res = {"framework": args.framework, "seed": args.seed, "steps": steps,
           "settings": {k: getattr(args, k) for k in ("model", "steps", "group_size", "groups", "max_new_tokens",
                                                      "temperature", "lr", "threads", "eval_records",
                                                      "train_vision")},
           "time": {k: _summary([s[k] for s in steps]) for k in ("total_s", "generation_s", "update_s")},
           "time_after_first": {k: _summary([s[k] for s in steps[1:]]) for k in ("total_s", "generation_s",
                                                                                   "update_s")},
           "eval": summary, "eval_s": time.perf_counter() - t0, "versions": versions(),
           "command": " ".join([Path(sys.executable).name] + sys.argv)}
    if "dataset_build_s" in run:
        res["dataset_build_s"] = run["dataset_build_s"]
    out = Path(args.out) / f"train_{args.framework}_seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"{args.framework} seed {args.seed}: accuracy {summary['accuracy']:.3f} after {args.steps} steps; "
          f"{res['time']['total_s']['mean']:.2f} s/step → {out}", flush=True)


def cmd_profile(args) -> None:
    """Where a flowrl step's time goes: the pieces of one rollout + update at the benchmark's batch size (median of
    ``--profile-reps``), to set against TRL's generation / update split."""
    import torch

    from flowrl.text.policy import VLMPolicy
    from flowrl.text.trainer import load_vlm, render_images
    from flowrl.text.vqa import read_jsonl

    torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    model.eval()
    freeze_vision(model)
    policy = VLMPolicy(model, processor, args.temperature, args.max_new_tokens)
    recs = [r for r in read_jsonl(args.train_data)[: args.groups] for _ in range(args.group_size)]
    times: dict[str, list[float]] = {}

    def clock(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for rep in range(args.profile_reps):
        ims = clock("render images", lambda: render_images(recs))
        inputs = clock("processor (chat template + images)",
                       lambda: policy.prompt_inputs(ims, [r["question"] for r in recs]))
        comp = clock("generate", lambda: policy.generate(inputs, seed=rep))
        with torch.no_grad():
            clock("old log-probs (no-grad forward)", lambda: policy.token_log_probs(inputs, comp.ids, comp.mask))
        lp = clock("forward with grad", lambda: policy.token_log_probs(inputs, comp.ids, comp.mask))
        clock("backward", lambda: lp.sum().backward())
        model.zero_grad(set_to_none=True)
    res = {"batch": len(recs), "reps": args.profile_reps,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "command": " ".join([Path(sys.executable).name] + sys.argv)}
    out = Path(args.out) / "profile_flowrl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["median_s"], indent=1), f"→ {out}")


def cmd_base(args) -> None:
    import torch

    from flowrl.text.trainer import load_vlm

    torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    res = {"eval": evaluate(model, processor, args), "eval_records": args.eval_records,
           "command": " ".join([Path(sys.executable).name] + sys.argv)}
    out = Path(args.out) / "base.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"base accuracy {res['eval']['accuracy']:.3f} → {out}")


def cmd_parity(args) -> None:
    import torch

    from flowrl.text.vqa import read_jsonl

    torch.set_num_threads(args.threads)
    records = read_jsonl(args.train_data)[: args.parity_records]
    res = {"versions": versions(), "command": " ".join([Path(sys.executable).name] + sys.argv), "runs": []}
    for temp in args.parity_temperatures:
        r = loss_parity(args.model, records, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                        temperature=temp, seed=args.seed, work_dir=Path(args.out) / "parity_work")
        res["runs"].append(r)
        for row in r["rows"]:
            print(f"T={temp} {row['name']:<32} trl {row['trl_loss']:+.8f} flowrl {row['flowrl_loss']:+.8f} "
                  f"rel {row['rel_diff']:.1e} grad {row['grad_rel_diff']:.1e} accum rel "
                  f"{row['accumulated']['rel_diff']:.1e}", flush=True)
        print(json.dumps(r["log_probs"]), "prompts identical:", r["prompt_tokens_identical"], flush=True)
    out = Path(args.out) / "parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"→ {out}")


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------

def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def cmd_report(args) -> None:
    out = Path(args.out)
    parity = json.loads((out / "parity.json").read_text()) if (out / "parity.json").is_file() else None
    base = json.loads((out / "base.json").read_text()) if (out / "base.json").is_file() else None
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("train_*_seed*.json"))]
    report = {"versions": versions(), "parity": parity, "base": base, "train": runs}
    (out / "trl_comparison.json").write_text(json.dumps(report, indent=2))
    Path(args.json).write_text(json.dumps(report, indent=2))

    v = (parity or (runs[0] if runs else {})).get("versions", versions())
    lines = ["# flowrl vs TRL `GRPOTrainer` on the embedded tiny Qwen2-VL", "",
             "Generated by `python scripts/benchmark_trl.py report` from `runs/trl_comparison/*.json` "
             "(all numbers: `docs/trl_comparison.json`). Parity test: "
             "`OMP_NUM_THREADS=1 python -m pytest tests/test_trl_parity.py` (skipped without TRL).", "",
             "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + ".", ""]
    if parity:
        match = [row for r in parity["runs"] for row in r["rows"] if row["expect_match"]]
        lines += ["## (a) Loss on identical inputs", "", f"Command: `{parity['command']}`", "",
                  "Over all matching rows and both temperatures: |Δ|/scale ≤ "
                  f"{max(x['scaled_diff'] for x in match):.1e}, "
                  f"plain relative difference ≤ {max(x['rel_diff'] for x in match):.1e}, gradient relative difference "
                  f"≤ {max(x['grad_rel_diff'] for x in match):.1e}; per-token log-probs agree to "
                  f"{max(r['log_probs']['max_abs_diff_trl_vs_flowrl_unsuppressed'] for r in parity['runs']):.1e} "
                  "(float32 log-softmax computed two ways: TRL's chunked fused head vs full logits).", "",
                  "Columns: *|Δ|/scale* = |TRL − flowrl| divided by the same aggregation of |per-token loss| "
                  "(the float32 yardstick: a sum of terms of both signs can be close to 0, which inflates the plain "
                  "*rel.* = |Δ|/max(|loss|)); *grad* = ‖∇TRL − ∇flowrl‖/‖∇TRL‖ over the trainable parameters; "
                  "*2 µ-batches* = the sum of the two micro-batch losses of an accumulated step (TRL with "
                  "gradient_accumulation_steps = steps_per_generation = 2, flowrl with its global normaliser); "
                  "*as shipped* = flowrl scoring with the vision tokens suppressed (its own old/reference "
                  "log-probs, same perturbations).", ""]
        for r in parity["runs"]:
            s = r["settings"]
            lines += [f"### temperature {s['temperature']}: {s['completions']} completions ({s['records']} questions "
                      f"× {s['group_size']}), {s['completion_tokens']} completion tokens, "
                      f"max {s['max_new_tokens']}", "",
                      f"Prompt tokens identical to TRL's own tokenisation: **{r['prompt_tokens_identical']}**; pixel "
                      f"values identical: **{r['pixel_values_identical']}**. Per-token log-probs, max |TRL − flowrl| "
                      f"over completion tokens: {r['log_probs']['max_abs_diff_trl_vs_flowrl_unsuppressed']:.2e} "
                      f"(same distribution: flowrl scoring with no banned tokens); "
                      f"{r['log_probs']['max_abs_diff_trl_vs_flowrl_shipped']:.2e} against flowrl as shipped "
                      f"(vision tokens suppressed; mean "
                      f"{r['log_probs']['mean_abs_diff_trl_vs_flowrl_shipped']:.2e}).", "",
                      "| TRL loss_type (ε, ε_high, IS level, β) | flowrl (algorithm: loss, clip, aggregation) "
                      "| TRL loss | flowrl loss | \\|Δ\\|/scale | rel. | grad | 2 µ-batches \\|Δ\\|/scale "
                      "| as shipped \\|Δ\\|/scale, grad | "
                      "match |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for row in r["rows"]:
                t, f = row["trl"], row["flowrl"]
                clip = f"{f['clip_range']:g}" + (f"/{f['clip_range_high']:g}" if f["clip_range_high"] else "")
                kl = f" + {f['kl_beta']:g}·k3" if f["kl_beta"] else ""
                extra = " (use_bias_correction_kl=False)" if "no KL IS" in row["name"] else ""
                ok = row["scaled_diff"] < 1e-6 and row["grad_rel_diff"] < 1e-4
                ok_acc = row["accumulated"]["scaled_diff"] < 1e-6
                verdict = ("yes" if ok and ok_acc else "single batch only" if ok else "no")
                lines.append(
                    f"| `{t['loss_type']}` ({t['epsilon']:g}, {t['epsilon_high']:g}, {t['importance_sampling_level']}"
                    f", {t['beta']:g}){extra} | {f['algorithm']}: {f['policy_loss']}, {clip}, "
                    f"{f['loss_aggregation']}{kl} | {row['trl_loss']:+.8f} | {row['flowrl_loss']:+.8f} | "
                    f"{row['scaled_diff']:.1e} | {row['rel_diff']:.1e} | {row['grad_rel_diff']:.1e} | "
                    f"{row['accumulated']['scaled_diff']:.1e} (tokens {row['accumulated']['tokens']}) | "
                    f"{row['shipped']['scaled_diff']:.1e}, {row['shipped']['grad_rel_diff']:.1e} | {verdict} |")
            lines.append("")
        notes = [row["note"] for row in parity["runs"][0]["rows"] if row["note"]]
        lines += ["Not matched (no flowrl counterpart): " + "; ".join(f"`{k}` — {v}" for k, v in
                                                                   parity["runs"][0]["unmatched"].items()) + ".", ""]
        lines += [f"Note: {n}." for n in notes] + [""]
    if runs:
        by = {}
        for r in runs:
            by.setdefault(r["framework"], []).append(r)
        s0 = runs[0]["settings"]
        lines += ["## (b) Wall-clock per step and (c) accuracy after the same number of steps", "",
                  f"Settings: {s0['steps']} optimizer steps, {s0['groups']} questions × {s0['group_size']} completions "
                  f"per step, max {s0['max_new_tokens']} new tokens, temperature {s0['temperature']}, lr {s0['lr']:g} "
                  f"(constant, AdamW β=(0.9, 0.999), no weight decay, grad-norm clip 1.0), vision tower "
                  f"{'trained' if s0.get('train_vision') else 'frozen'}, reward "
                  f"`vqa_accuracy`, GRPO loss (PPO clip 0.2, per-sequence token mean, β=0), {s0['threads']} thread. "
                  f"Held-out accuracy: greedy, first {s0['eval_records']} records of the test split.", ""]
        if base:
            pb, nb = base["eval"]["accuracy"], base["eval"]["n"]
            lines += [f"Base model accuracy on the same records: **{pb:.3f}** (binomial standard error of one "
                      f"evaluation on {nb} records: ±{(pb * (1 - pb) / nb) ** 0.5:.3f}).", ""]
        lines += ["| framework | seed | s/step (mean) | generation+scoring s | update s | s/step (median) | "
                  "mean reward (first → last 5 steps) | held-out accuracy |", "|---|---|---|---|---|---|---|---|"]
        for fw, rs in by.items():
            for r in rs:
                rw = [s["reward"] for s in r["steps"] if s["reward"] is not None]
                rw_txt = (f"{statistics.fmean(rw[:5]):.3f} → {statistics.fmean(rw[-5:]):.3f}" if rw else "—")
                lines.append(f"| {fw} | {r['seed']} | {r['time']['total_s']['mean']:.2f} | "
                             f"{r['time']['generation_s']['mean']:.2f} | {r['time']['update_s']['mean']:.2f} | "
                             f"{r['time']['total_s']['median']:.2f} | {rw_txt} | {r['eval']['accuracy']:.3f} |")
        for fw, rs in by.items():
            accs = [r["eval"]["accuracy"] for r in rs]
            tps = [r["time"]["total_s"]["mean"] for r in rs]
            lines.append(f"| **{fw} (mean of {len(rs)})** | | {statistics.fmean(tps):.2f} | | | | | "
                         f"**{statistics.fmean(accs):.3f}** |")
        build_s = statistics.fmean([r.get("dataset_build_s", 0.0) for r in by.get("trl", [])] or [0.0])
        lines += ["", "s/step is the wall-clock of one optimizer step: generation + scoring (flowrl: render the "
                  "scenes, "
                  "processor, sampling, old log-probs, reward, advantages; TRL: `_generate_and_score_completions`) and "
                  "the update (flowrl: re-processing the prompts, forward, backward, AdamW; TRL: the rest of the "
                  "step, timed by a callback). TRL's one-off dataset build (rendering the 10 000 training scenes into "
                  f"a `datasets.Dataset`, {build_s:.1f} s) "
                  "is not counted.", ""]
        prof = out / "profile_flowrl.json"
        if prof.is_file():
            pr = json.loads(prof.read_text())
            lines += [f"Where a flowrl step goes (median of {pr['reps']} repetitions, batch {pr['batch']}, "
                      f"`{pr['command']}`):", "", "| piece | s |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in pr["median_s"].items()]
            lines += ["", "The extra no-grad forward for the old log-probs is what TRL skips on-policy "
                      "(`num_iterations = 1`, one optimizer step per generation batch: it uses `logp.detach()`); "
                      "without it the two steps cost about the same.", ""]
        cmds = ([parity["command"]] if parity else []) + ([base["command"]] if base else [])
        cmds += [json.loads(prof.read_text())["command"]] if prof.is_file() else []
        cmds += [r["command"] for r in runs] + ["python scripts/benchmark_trl.py report"]
        lines += ["Commands (from the repository root, each with `OMP_NUM_THREADS=1`, one after the other):", ""]
        lines += [f"    {c}" for c in cmds] + [""]
    Path(args.doc).write_text("\n".join(lines) + NOTES + (Path(args.notes).read_text() if args.notes else ""))
    print(f"→ {args.json}, {args.doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["parity", "train", "base", "profile", "report"])
    p.add_argument("--framework", choices=["flowrl", "trl"], default="flowrl")
    p.add_argument("--model", default="assets/shapes-qwen2vl")
    p.add_argument("--train-data", default="assets/vqa/vqa_train.jsonl")
    p.add_argument("--test-data", default="assets/vqa/vqa_test.jsonl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups", type=int, default=16, help="questions per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-records", type=int, default=200)
    p.add_argument("--train-vision", action="store_true",
                   help="train the ViT too (default: frozen in both frameworks, flowrl's model.freeze_vision=true)")
    p.add_argument("--parity-records", type=int, default=4, help="questions in the parity batch (× group size)")
    p.add_argument("--parity-temperatures", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--profile-reps", type=int, default=5)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--doc", default=str(ROOT / "docs" / "trl_comparison.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "trl_comparison.json"))
    p.add_argument("--notes", default=None, help="a markdown file appended to the report")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"parity": cmd_parity, "train": cmd_train, "base": cmd_base, "profile": cmd_profile,
     "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
