"""GRPO-family training of a vision-language model on verifiable rewards, on the shared core (a token is a step).

One epoch (``VLMTrainer.run``):

1. **Groups.** ``trainer.groups_per_epoch`` VQA records drawn with a seeded generator (identical on every rank), each
   repeated ``group_size`` times; rank ``r`` takes its contiguous slice of the samples.
2. **Rollout.** Chat prompt + image → temperature sampling (:class:`~flowrl.text.policy.VLMPolicy`; vision tokens
   can never be sampled) → per-token old log-probs from a full forward pass at the same temperature (so an unchanged
   policy has ratio exactly 1) and, with ``kl_beta > 0``, the reference's log-probs (LoRA disabled, or a frozen copy
   under full fine-tuning).
3. **Rewards** from the registered text rewards (``vqa_accuracy``, ``vqa_format``, ``overlong`` or ``multi``); a
   NaN/inf reward stops the run after saving a checkpoint.
4. **Advantages** by name over all ranks (:func:`flowrl.core.compute_advantages`); DAPO dynamic sampling drops
   zero-variance groups and rolls out more rounds; CPPO keeps the top ``(1-P)·G`` ``|A|`` per group.
5. **Update**: ``inner_epochs`` × ``optimizer_steps_per_epoch`` optimizer steps, each over an equal part of the batch in
   micro-batches; loss = the core's policy loss (PPO clip / clip-higher / dual clip / GSPO / GMPO / REINFORCE) +
   ``kl_beta`` × the core's KL estimator, reduced by :func:`flowrl.core.aggregate_loss` with an explicit global
   normaliser (tokens, samples or ``max_new_tokens`` × samples over all micro-batches and ranks), so gradient
   accumulation and the number of ranks do not change the update.

Evaluation: greedy decoding on the held-out records, exact-match accuracy per tag (``scripts/evaluate_vlm.py``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from flowrl.core import (KL_ESTIMATORS, POLICY_LOSSES, aggregate_loss, compute_advantages, cppo_keep_mask,
                         informative_groups, select_groups)
from flowrl.text.config import VLMTrainConfig, validate_vlm
from flowrl.text.policy import VLMPolicy
from flowrl.runtime import open_run_dir, reduce_and_clip

MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def load_vlm(pretrained: str, family: str = "qwen2_vl", dtype: str = "float32"):
    """``(model, processor)`` of a Qwen2-VL-family checkpoint (local folder or hub id), as for
    ``Qwen/Qwen2-VL-2B-Instruct``: ``<Class>.from_pretrained`` + the processor (``AutoProcessor`` where torchvision is
    installed, else :func:`flowrl.text.tiny_qwen2vl.load_processor`'s image-only processor).

    Raises:
        FileNotFoundError: a local-looking path that does not exist (says how to build the embedded model).
        ValueError: unknown ``family``.
    """
    import transformers

    from flowrl.text.tiny_qwen2vl import load_processor

    if family not in MODEL_CLASSES:
        raise ValueError(f"model.family={family!r}: choose from {sorted(MODEL_CLASSES)}")
    p = Path(pretrained)
    if (pretrained.startswith((".", "/", "assets", "runs")) or p.exists()) and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.pretrained={pretrained!r}: no model folder there (config.json missing). The "
                                "embedded default is built by `python scripts/pretrain_vlm.py`")
    cls = getattr(transformers, MODEL_CLASSES[family])
    model = cls.from_pretrained(pretrained, dtype=getattr(torch, dtype))
    return model, load_processor(pretrained)


def render_images(records: list[dict]) -> list[np.ndarray]:
    """The image of each record: ``record["image"]`` (a file path) if present, else the shapes scene rendered from
    ``record["objects"]``.

    Raises:
        FileNotFoundError: an ``image`` path that does not exist. ValueError: a record with neither.
    """
    from PIL import Image

    from flowrl.text.vqa import render_record

    out = []
    for i, r in enumerate(records):
        if r.get("image"):
            path = Path(r["image"])
            if not path.is_file():
                raise FileNotFoundError(f"record {i} ({r.get('question', '')[:60]!r}): image file {path} not found")
            out.append(np.asarray(Image.open(path).convert("RGB")))
        elif "objects" in r:
            out.append(render_record(r))
        else:
            raise ValueError(f"record {i} ({r.get('question', '')[:60]!r}) has no image: give 'image' (a file path) "
                             "or 'objects' (a shapes scene)")
    return out


def check_records(records: list[dict], path: str) -> None:
    """Refuse records that cannot be trained or scored: an empty question or answer.

    Raises:
        ValueError: naming the record.
    """
    from flowrl.text.vqa import normalize_answer

    for i, r in enumerate(records):
        if not str(r.get("question", "")).strip():
            raise ValueError(f"{path}: record {i} has an empty question")
        if not normalize_answer(r.get("answer", "")):
            raise ValueError(f"{path}: record {i} ({r['question'][:60]!r}) has an empty answer; every record needs a "
                             "non-empty reference answer for the accuracy reward")


def check_prompt_lengths(policy: VLMPolicy, records: list[dict], path: str) -> None:
    """Refuse, before any rollout, a data file whose longest prompt does not fit the context with the completion.

    The chat template and the image tokens are the same for every record of a file (fixed-size scenes), so the
    question with the most tokens gives the longest prompt; it is built exactly as a rollout builds it
    (:meth:`VLMPolicy.prompt_inputs`), image included.

    Raises:
        ValueError: naming the file, the record and how many tokens are over.
    """
    if not records:
        return
    tok = policy.processor.tokenizer
    lengths = [len(tok(str(r["question"]))["input_ids"]) for r in records]
    i = int(np.argmax(lengths))
    try:
        policy.prompt_inputs(render_images([records[i]]), [records[i]["question"]])
    except ValueError as e:
        raise ValueError(f"{path}: record {i}: {e}") from None


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s


class VLMTrainer:
    """The VLM GRPO loop (see the module docstring). Build with a validated :class:`VLMTrainConfig`.

    Raises:
        ConfigError: invalid config (:func:`~flowrl.text.config.validate_vlm`).
        FileNotFoundError / ValueError: missing model or data files, malformed or unscorable records.
    """

    def __init__(self, cfg: VLMTrainConfig):
        from accelerate import Accelerator

        from flowrl.rewards import load_reward
        from flowrl.text.vqa import read_jsonl

        self.cfg = cfg
        t, m = cfg.trainer, cfg.model
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        if t.threads:
            torch.set_num_threads(t.threads)
        self.per_rank = validate_vlm(cfg, self.acc.num_processes)
        self.train_records = read_jsonl(cfg.data.train)
        self.test_records = read_jsonl(cfg.data.test)
        check_records(self.train_records, cfg.data.train)
        check_records(self.test_records, cfg.data.test)
        if cfg.data.eval_max_records:
            self.test_records = self.test_records[: cfg.data.eval_max_records]
        torch.manual_seed(t.seed)
        model, processor = load_vlm(m.pretrained, m.family, m.dtype)
        model.to(self.acc.device)
        self.ref_model = None
        if m.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            targets = "|".join(m.lora_targets)
            model = get_peft_model(model, LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha,
                                                     target_modules=rf"^(?!.*visual).*\.({targets})$"))
        else:
            if cfg.algorithm.kl_beta > 0:
                self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            for n, p in model.named_parameters():
                p.requires_grad_(not (m.freeze_vision and ".visual." in f".{n}"))
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: check model.lora_targets / model.freeze_vision")
        self.policy = VLMPolicy(model, processor, m.temperature, m.max_new_tokens, m.system)
        # full fine-tuning with KL: the frozen copy scores with the same template, temperature and banned tokens
        check_prompt_lengths(self.policy, self.train_records, cfg.data.train)
        check_prompt_lengths(self.policy, self.test_records, cfg.data.test)
        self.ref_policy = (VLMPolicy(self.ref_model, processor, m.temperature, m.max_new_tokens, m.system)
                           if self.ref_model is not None else None)
        self.epoch = 0  # the epoch being trained (names fault checkpoints)
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
        self.reward_fn = load_reward(cfg.reward.name, **dict(cfg.reward.args))
        self.loss_fn = POLICY_LOSSES[cfg.algorithm.policy_loss]
        self.on_policy = cfg.algorithm.inner_epochs == 1 and t.optimizer_steps_per_epoch == 1
        self.out = Path(t.output_dir)
        self.history: list[dict] = []
        self.writer = None
        if self.acc.is_main_process:
            self.writer = open_run_dir(self.out, asdict(cfg))

    # -- data ----------------------------------------------------------------------------------------------------
    def epoch_records(self, epoch: int, round_: int = 0) -> tuple[list[dict], torch.Tensor]:
        """This rank's records of an epoch round and their global group ids ``[n]``."""
        t = self.cfg.trainer
        rng = np.random.default_rng([t.seed, epoch, round_])
        chosen = rng.choice(len(self.train_records), size=t.groups_per_epoch,
                            replace=t.groups_per_epoch > len(self.train_records))
        rank = self.acc.process_index
        idx = range(rank * self.per_rank, (rank + 1) * self.per_rank)
        gid = [i // t.group_size for i in idx]
        return ([self.train_records[chosen[g]] for g in gid],
                torch.tensor(gid, dtype=torch.long) + round_ * t.groups_per_epoch)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x.to(self.acc.device)).cpu() if self.acc.num_processes > 1 else x

    def _reference(self):
        """Context in which ``self.policy`` scores with the reference (LoRA disabled); full FT uses ``ref_model``."""
        return self.model.disable_adapter() if self.cfg.model.lora_rank > 0 else nullcontext()

    # -- rollout -------------------------------------------------------------------------------------------------
    def rollout(self, records: list[dict], epoch: int, round_: int) -> list[dict]:
        """Sample one completion per record; return per-sample dicts (``record``, ``ids``/``old``/``ref`` 1-D over the
        completion's tokens, ``text``, ``truncated``)."""
        mb, kl = self.cfg.trainer.micro_batch, self.cfg.algorithm.kl_beta > 0
        samples = []
        images = render_images(records)
        for j in range(0, len(records), mb):
            recs, ims = records[j : j + mb], images[j : j + mb]
            inputs = self.policy.prompt_inputs(ims, [r["question"] for r in recs])
            comp = self.policy.generate(inputs, _seed(self.cfg.trainer.seed, epoch, round_,
                                                      self.acc.process_index, j))
            with torch.no_grad():
                # on-policy (one optimizer step, one inner epoch): the update's own log-probs, detached, are the old
                # ones (ratio exactly 1), so the rollout skips that forward pass
                old = None if self.on_policy else self.policy.token_log_probs(inputs, comp.ids, comp.mask)
                ref = None
                if kl:
                    if self.ref_policy is not None:
                        ref = self.ref_policy.token_log_probs(inputs, comp.ids, comp.mask)
                    else:
                        with self._reference():
                            ref = self.policy.token_log_probs(inputs, comp.ids, comp.mask)
            for k, r in enumerate(recs):
                n_tok = int(comp.mask[k].sum())
                samples.append({"record": r, "image": ims[k], "ids": comp.ids[k, :n_tok].clone(),
                                "old": None if old is None else old[k, :n_tok].clone(), "ref": None if ref is None else ref[k, :n_tok].clone(),
                                "text": comp.text[k], "truncated": bool(comp.truncated[k])})
        return samples

    def score(self, samples: list[dict], epoch: int) -> dict[str, np.ndarray]:
        """Reward columns of the samples (checked; NaN/inf saves a checkpoint and raises)."""
        from flowrl.rewards import check_reward_output

        meta = [{**s["record"], "completion_tokens": len(s["ids"]), "max_new_tokens": self.cfg.model.max_new_tokens}
                for s in samples]
        cols = check_reward_output(self.reward_fn([s["text"] for s in samples],
                                                  [s["record"]["question"] for s in samples], meta),
                                   len(samples), self.cfg.reward.name)
        bad = ~np.isfinite(cols["reward"])
        if bad.any():
            path = self.save(f"nan_reward_epoch_{epoch:04d}")
            i = int(np.flatnonzero(bad)[0])
            raise RuntimeError(f"reward {self.cfg.reward.name!r} returned NaN/inf at epoch {epoch} (e.g. for "
                               f"{samples[i]['text'][:80]!r}); training stopped, the model was saved to {path}")
        return cols

    def collect(self, epoch: int) -> dict:
        """Roll out, score and compute advantages for one epoch (dynamic sampling and CPPO included)."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        rounds = a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1
        samples, cols, r_glob, g_glob, pos, offset = [], [], [], [], [], 0
        informative_frac = 1.0
        for rnd in range(rounds):
            recs, gids = self.epoch_records(epoch, rnd)
            s = self.rollout(recs, epoch, rnd)
            c = self.score(s, epoch)
            r_all = self._gather(torch.as_tensor(c["reward"], dtype=torch.float32))
            g_all = self._gather(gids)
            n = len(s)
            pos.append(torch.arange(offset + self.acc.process_index * n, offset + (self.acc.process_index + 1) * n))
            offset += len(r_all)
            samples += s
            cols.append(c)
            r_glob.append(r_all)
            g_glob.append(g_all)
            if rnd == 0:
                keep0 = informative_groups(r_all, g_all)
                informative_frac = float(torch.unique(g_all[keep0]).numel() / torch.unique(g_all).numel())
            if a.dynamic_sampling:
                r_cat, g_cat = torch.cat(r_glob), torch.cat(g_glob)
                if torch.unique(g_cat[informative_groups(r_cat, g_cat)]).numel() >= t.groups_per_epoch:
                    break
        r_cat, g_cat = torch.cat(r_glob), torch.cat(g_glob)
        sel = (select_groups(informative_groups(r_cat, g_cat), g_cat, t.groups_per_epoch) if a.dynamic_sampling
               else torch.ones(len(r_cat), dtype=torch.bool))
        adv = torch.zeros(len(r_cat))
        if sel.any():
            adv[sel] = compute_advantages(r_cat[sel], g_cat[sel], a.advantage, a.advantage_eps,
                                          a.advantage_clip if a.advantage_clip > 0 else None)
        if a.cppo_prune_rate > 0 and sel.any():
            keep = torch.zeros_like(sel)
            keep[sel] = cppo_keep_mask(adv[sel], g_cat[sel], a.cppo_prune_rate)
            sel = keep
        p = torch.cat(pos)
        for s, adv_i, keep in zip(samples, adv[p].tolist(), sel[p].tolist()):
            s["adv"], s["keep"] = adv_i, keep
        merged = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
        return {"samples": samples, "cols": merged, "rewards_all": r_cat, "informative_frac": informative_frac,
                "rounds": len(r_glob), "trained": int(sel.sum())}

    # -- update --------------------------------------------------------------------------------------------------
    def _batch(self, items: list[dict]):
        """Re-tokenise prompts and right-pad completions of a micro-batch: ``(inputs, ids, mask, old, ref, adv)``."""
        pad = self.policy.pad
        L = max(1, max(len(s["ids"]) for s in items))
        b = len(items)
        ids = torch.full((b, L), pad, dtype=torch.long)
        mask = torch.zeros(b, L, dtype=torch.bool)
        old = torch.zeros(b, L) if items[0]["old"] is not None else None
        ref = torch.zeros(b, L) if items[0]["ref"] is not None else None
        for k, s in enumerate(items):
            n = len(s["ids"])
            ids[k, :n], mask[k, :n] = s["ids"], True
            if old is not None:
                old[k, :n] = s["old"]
            if ref is not None:
                ref[k, :n] = s["ref"]
        inputs = self.policy.prompt_inputs([s["image"] for s in items], [s["record"]["question"] for s in items])
        return inputs, ids, mask, old, ref, torch.tensor([s["adv"] for s in items])

    def _normaliser(self, part: list[dict]) -> float:
        """Global normaliser of one optimizer step over all ranks (see :func:`flowrl.core.aggregate_loss`)."""
        mode, L = self.cfg.algorithm.loss_aggregation, self.cfg.model.max_new_tokens
        local = float(sum(len(s["ids"]) for s in part)) if mode == "step_mean" else float(len(part))
        total = float(self._gather(torch.tensor([local], dtype=torch.float64)).sum())
        if mode == "constant":
            return total * L
        if mode == "seq_mean_step_sum_norm":
            return float(L)
        return total

    def update(self, samples: list[dict]) -> dict[str, float]:
        """Policy-gradient update on the kept samples; returns mean statistics."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        kept = [s for s in samples if s["keep"] and len(s["ids"]) > 0]
        stats: dict[str, list[float]] = {"policy_loss": [], "kl": [], "clipfrac": [], "ratio": [], "first_ratio_dev": []}
        self.model.eval()  # no dropout: the recomputed log-probs must equal the rollout's (ratio exactly 1)
        world = self.acc.num_processes
        extra = {"dual_clip_c": a.dual_clip_c} if a.policy_loss == "dual_clip" else {}
        first = True
        for _ in range(a.inner_epochs):
            for part in np.array_split(np.arange(len(kept)), t.optimizer_steps_per_epoch):
                part_items = [kept[i] for i in part]
                norm = self._normaliser(part_items)
                if norm <= 0:
                    continue
                for j in range(0, len(part_items), t.micro_batch):
                    inputs, ids, mask, old, ref, adv = self._batch(part_items[j : j + t.micro_batch])
                    lp = self.policy.token_log_probs(inputs, ids, mask)
                    if old is None:  # on-policy: nothing has moved since the rollout
                        old = lp.detach()
                    out = self.loss_fn(lp, old, adv, mask, a.clip_range, a.clip_range_high, **extra)
                    loss = aggregate_loss(out.loss, mask, a.loss_aggregation, norm)
                    if ref is not None and a.kl_beta > 0:
                        kl = KL_ESTIMATORS[a.kl_estimator](lp, ref)
                        loss = loss + a.kl_beta * aggregate_loss(kl, mask, a.loss_aggregation, norm)
                        stats["kl"].append(float(kl.detach()[mask].mean()))
                    (loss * world).backward()
                    with torch.no_grad():
                        stats["policy_loss"].append(float(out.loss[mask].mean()))
                        stats["clipfrac"].append(float(out.clipped[mask].float().mean()))
                        stats["ratio"].append(float(out.ratio[mask].mean()))
                        if first:
                            stats["first_ratio_dev"].append(float((lp - old)[mask].abs().max().exp() - 1))
                    first = False
                self._optimizer_step()
        return {k: float(np.mean(v)) for k, v in stats.items() if v}

    def _optimizer_step(self) -> None:
        norm = reduce_and_clip(self.acc, self.params, self.cfg.trainer.grad_clip)
        if not math.isfinite(norm):  # NaN/inf loss: never apply the step; keep the last good weights
            self.opt.zero_grad(set_to_none=True)
            path = self.save(f"nan_loss_epoch_{self.epoch:04d}")
            raise RuntimeError(f"non-finite gradient (norm {norm}) at epoch {self.epoch}: the loss is NaN/inf. The "
                               f"step was not applied and the model before it was saved to {path}. Lower "
                               "trainer.lr or check the rewards")
        self.last_grad_norm = norm
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # -- evaluation / checkpoints --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, name: str) -> dict:
        """Greedy held-out evaluation (main process): writes ``eval/<name>/{results.jsonl,summary.json,summary.md}``."""
        from flowrl.text.evaluation import evaluate_policy, write_report

        res = evaluate_policy(self.policy, self.test_records, self.cfg.trainer.eval_batch)
        write_report(res, self.out / "eval" / name)
        return res["summary"]

    def save(self, name: str) -> Path:
        """Save the trained model (LoRA adapter or full weights) and the processor to ``output_dir/checkpoints/name``."""
        path = self.out / "checkpoints" / name
        if self.acc.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(path)
            self.policy.processor.save_pretrained(path)
        return path

    def run(self) -> dict:
        """Train ``trainer.epochs`` epochs with base/final held-out evaluations; returns the summaries."""
        from tqdm.auto import tqdm

        t = self.cfg.trainer
        results = {}
        if t.eval_base and self.acc.is_main_process:
            results["base"] = self.evaluate("base")
            print(f"base held-out accuracy {results['base']['accuracy']:.3f}", flush=True)
        bar = tqdm(range(t.epochs), desc="vlm_grpo", disable=not self.acc.is_main_process)
        for epoch in bar:
            self.epoch = epoch
            t0 = time.time()
            batch = self.collect(epoch)
            t1 = time.time()
            stats = self.update(batch["samples"])
            t2 = time.time()
            cols = batch["cols"]
            log = {"reward/mean": float(batch["rewards_all"].mean()), "reward/std": float(batch["rewards_all"].std()),
                   **{f"reward/{k}": float(self._gather(torch.as_tensor(v)).mean()) for k, v in cols.items()
                      if k != "reward"},
                   **{f"train/{k}": v for k, v in stats.items()},
                   "train/grad_norm": getattr(self, "last_grad_norm", 0.0),
                   "train/informative_groups": batch["informative_frac"], "train/rounds": float(batch["rounds"]),
                   "train/samples": float(batch["trained"]),
                   "train/completion_tokens": float(np.mean([len(s["ids"]) for s in batch["samples"]])),
                   "time/rollout_s": t1 - t0, "time/update_s": t2 - t1}
            if t.eval_every and (epoch + 1) % t.eval_every == 0 and self.acc.is_main_process:
                log["eval/accuracy"] = self.evaluate(f"epoch_{epoch + 1:04d}")["accuracy"]
            self.history.append({"epoch": epoch, **log})
            if self.acc.is_main_process:
                with open(self.out / "history.jsonl", "a" if epoch else "w") as f:
                    f.write(json.dumps(self.history[-1]) + "\n")
                if self.writer is not None:
                    for k, v in log.items():
                        self.writer.add_scalar(k, v, epoch)
            acc_key = next((k for k in ("reward/vqa_accuracy", "reward/mean") if k in log), "reward/mean")
            bar.set_postfix(reward=f"{log['reward/mean']:.3f}", acc=f"{log[acc_key]:.3f}",
                            kl=f"{log.get('train/kl', 0.0):.2e}", clip=f"{log.get('train/clipfrac', 0.0):.2f}")
            if t.save_every and (epoch + 1) % t.save_every == 0:
                self.save(f"epoch_{epoch + 1:04d}")
        self.save("final")
        if self.acc.is_main_process:
            results["trained"] = self.evaluate("trained")
            from flowrl.text.evaluation import comparison_table

            if "base" in results:
                md = comparison_table({"base": results["base"], "trained": results["trained"]})
                (self.out / "eval" / "comparison.md").write_text(md)
                print(md)
            print(f"held-out accuracy: {results['trained']['accuracy']:.3f}", flush=True)
        return results
