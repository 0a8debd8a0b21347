"""Verified matrix (issue 4 §6): every valid (update rule × sampler) pair trained on one benchmark with one budget.

    python scripts/verified_matrix.py --dry-run                      # list the pairs and the refused combinations
    python scripts/verified_matrix.py                                # the full matrix, embedded model (~35-45 min on 2 cores)
    python scripts/verified_matrix.py --pairs flow_grpo:cps,nft:ode  # a subset (fnmatch patterns: 'flow_grpo*:sde')
    python scripts/verified_matrix.py --model path/to/sd3 --override model.resolution=512 --epochs 20

Update rules (Hydra ``algorithm=`` groups of ``configs/``): ``flow_grpo`` with every policy loss of the trainer
(``flow_grpo`` = ``ppo_clip``, ``flow_grpo_dual_clip``, ``flow_grpo_reinforce``, ``flow_grpo_grpo_guard`` and the
trajectory-level ``flow_grpo_gspo`` / ``flow_grpo_gmpo`` with ``algorithm.loss_aggregation=seq_mean_step_mean``),
``flow_grpo_global_std``, ``nft`` (DiffusionNFT, run with ``sampler=ode`` only), ``flow_dpo`` (online pairs) and
``draft`` (DRaFT/ReFL, ``sampler=ode`` only; it needs a differentiable reward, so it trains on the embedded CLIP's
score, ``reward=clip_shapes``, and its held-out images are scored by the benchmark, ``algorithm.draft_eval_reward``).
Samplers: ``cps``, ``sde``, ``dance``, ``sde_fast``, ``ode``.

Every combination is composed with the budget overrides and checked by :func:`flowrl.config.validate`; a refused one
is recorded as ``refused: <first reason>`` (so the table documents the config refusals too). ``nft`` with an SDE
sampler is refused by this matrix, not by ``validate`` (which accepts it): DiffusionNFT is likelihood-free and its
config says to use ODE rollouts. Each remaining pair runs ``python -m accelerate.commands.launch
scripts/train_flowgrpo.py <overrides>`` in its own process with output in ``<out>/<rule>__<sampler>/``.

Held-out score before/after: ``overall`` of ``eval/base/summary.json`` and ``eval/trained/summary.json`` (strict
GenEval-style score for the shapes benchmark; ``reward`` for rewards without GenEval tags). The base model does not
depend on the update rule, so it is evaluated once per distinct evaluation setting (model, prompts, reward, eval
steps/CFG/images/seed/batch) by the trainer's own :meth:`~flowrl.trainer.Trainer.evaluate_heldout` in
``<out>/_base/<key>/``; every pair then trains with ``trainer.eval_base=false`` and gets a copy of that summary in
its ``eval/base/``. Wall clock: the training process from launch to exit (start-up, training, checkpoint, trained
evaluation; the shared base evaluation is reported separately). Train time: the sum of ``time/rollout_s`` and
``time/update_s`` of ``history.jsonl``. Peak memory: ``ru_maxrss`` of the pair's process tree from ``os.wait4`` on
that one child, i.e. the peak RSS of its largest process (the trainer); ``RUSAGE_CHILDREN`` of this process would
be a maximum over all pairs run so far, not a per-pair figure.

Outputs: the markdown table in ``--md`` (default ``docs/matrix.md``) and ``<out>/matrix.json`` (default
``runs/matrix``), rewritten after every pair so an interrupted matrix keeps what it measured. A failed pair is
recorded as ``failed: <last error line of its stderr>`` and the matrix continues; the exit status is 1 if any pair
failed (refusals are not failures), 2 for a bad command line. ``--dry-run`` writes ``<out>/plan.json`` only.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLERS = ("cps", "sde", "dance", "sde_fast", "ode")
# Display order of the policy losses; any further loss registered in flowrl.core.POLICY_LOSSES is appended.
LOSS_ORDER = ("ppo_clip", "dual_clip", "reinforce", "grpo_guard", "gspo", "gmpo")
INTERNAL_BASE_EVAL = "--internal-base-eval"


@dataclass(frozen=True)
class Rule:
    """An update rule of the matrix: its name (used in ``--pairs`` and run folders), the Hydra overrides that select
    it, and optionally the only samplers it is run with (``only_reason`` says why the others are refused)."""

    name: str
    overrides: tuple[str, ...]
    only_samplers: tuple[str, ...] | None = None
    only_reason: str = ""


def update_rules() -> list[Rule]:
    """The update rules of the matrix, in table order (policy losses from :data:`flowrl.core.POLICY_LOSSES`)."""
    from flowrl.core import POLICY_LOSSES, SEQUENCE_LOSSES

    losses = [l for l in LOSS_ORDER if l in POLICY_LOSSES] + sorted(set(POLICY_LOSSES) - set(LOSS_ORDER))
    rules = []
    for loss in losses:
        ov = ["algorithm=flow_grpo", f"algorithm.policy_loss={loss}"]
        if loss in SEQUENCE_LOSSES:  # trajectory-level ratio: the loss is defined per trajectory
            ov.append("algorithm.loss_aggregation=seq_mean_step_mean")
        rules.append(Rule("flow_grpo" if loss == "ppo_clip" else f"flow_grpo_{loss}", tuple(ov)))
    rules.append(Rule("flow_grpo_global_std", ("algorithm=flow_grpo_global_std",)))
    rules.append(Rule("nft", ("algorithm=nft",), only_samplers=("ode",),
                      only_reason="matrix: algorithm=nft is run on ODE rollouts only (sampler=ode, as "
                                  "configs/algorithm/nft.yaml says); flowrl.config.validate itself accepts it"))
    rules.append(Rule("raft", ("algorithm=raft",), only_samplers=("ode",),
                      only_reason="matrix: algorithm=raft (forward-process, likelihood-free) is run on ODE rollouts only"))
    rules.append(Rule("flow_dpo", ("algorithm=flow_dpo", "algorithm.dpo_pairs=online")))
    # DRaFT/ReFL always samples the deterministic ODE and needs a differentiable reward: it trains on the embedded
    # CLIP's score (reward=clip_shapes) and its held-out images are scored by the benchmark (draft_eval_reward)
    rules.append(Rule("draft", ("algorithm=draft", "reward=clip_shapes", "algorithm.draft_eval_reward=geneval_shapes"),
                      only_samplers=("ode",),
                      only_reason="matrix: algorithm=draft (DRaFT/ReFL) always samples the deterministic ODE "
                                  "(sampler.kind/noise_level unused): its row is sampler=ode"))
    return rules


@dataclass
class Budget:
    """The fixed budget of every pair (mapped to Hydra overrides by :meth:`overrides`)."""

    epochs: int = 10
    groups: int = 4
    group_size: int = 4
    eval_prompts: int = 0  # 0 = every held-out prompt
    eval_images: int = 1
    train_steps: int = 10
    eval_steps: int = 40
    micro_batch: int = 0  # 0 = the largest divisor of the per-rank samples that is ≤ 16
    threads: int = 0  # trainer.threads (0 = the trainer's default: all cores)
    num_processes: int = 1

    def overrides(self) -> list[str]:
        """Hydra overrides of the budget (``trainer.*`` and ``sampler.*`` keys)."""
        per_rank = max(1, self.groups * self.group_size // max(self.num_processes, 1))
        mb = self.micro_batch or max(d for d in range(1, min(per_rank, 16) + 1) if per_rank % d == 0)
        return [f"trainer.epochs={self.epochs}", f"trainer.groups_per_epoch={self.groups}",
                f"trainer.group_size={self.group_size}", f"trainer.micro_batch={mb}",
                "trainer.optimizer_steps_per_epoch=1", f"trainer.eval_max_prompts={self.eval_prompts}",
                f"trainer.eval_images_per_prompt={self.eval_images}", "trainer.eval_every=0",
                "trainer.save_every=0", f"trainer.threads={self.threads}",
                f"sampler.train_steps={self.train_steps}", f"sampler.eval_steps={self.eval_steps}"]


@dataclass
class Row:
    """One (rule, sampler) combination and what happened to it.

    ``status``: ``planned`` (dry run), ``ok``, ``refused`` or ``failed``; ``reason``: the refusal's first reason
    or the failure's last error line (``reason_full``: the whole refusal message); ``refused_by``: ``validate``
    (flowrl.config), ``matrix`` (this script's rule) or ``compose`` (Hydra/schema).
    """

    rule: str
    sampler: str
    overrides: list[str]
    status: str = "planned"
    reason: str = ""
    reason_full: str = ""
    refused_by: str = ""
    run_dir: str = ""
    before: float | None = None
    after: float | None = None
    delta: float | None = None
    metric: str = ""
    wall_s: float | None = None
    train_s: float | None = None
    peak_rss_mib: float | None = None
    returncode: int | None = None
    base_key: str = ""
    _cfg: object = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.rule}:{self.sampler}"

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------------------
# configuration


def hydra_value(v: str) -> str:
    """``v`` as a Hydra override value: unchanged when it is a plain token, else single-quoted (escaped)."""
    if re.fullmatch(r"[A-Za-z0-9_./\-+@~]+", v):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resolve_model(path: str) -> str:
    """An existing model folder as an absolute path (relative to the working directory, else to the repository);
    anything else (a hub id) unchanged."""
    p = Path(path)
    if p.exists():
        return str(p.resolve())
    if not p.is_absolute() and (ROOT / p).exists():
        return str((ROOT / p).resolve())
    return path


def first_reason(message: str) -> str:
    """The first reason of a refusal: the first ``- `` item of a :class:`~flowrl.config.ConfigError` listing
    (``invalid configuration:`` is only its header), else the first non-empty line; ``(+k more)`` when it lists
    more."""
    lines = [l.strip() for l in str(message).splitlines() if l.strip()]
    items = [l[2:] for l in lines if l.startswith("- ")]
    if items:
        return items[0] + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")
    return lines[0] if lines else str(message)


class Composer:
    """Composes ``configs/train.yaml`` with overrides (Hydra compose API) into a validated
    :class:`~flowrl.config.TrainConfig`, as ``scripts/train_flowgrpo.py`` does."""

    def __enter__(self):
        from hydra import initialize_config_dir

        from flowrl.config import register_configs

        register_configs()
        self._ctx = initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def compose(self, overrides: list[str]):
        """The schema-checked config (raises :class:`~flowrl.config.ConfigError` on unknown keys, Hydra's errors on
        a bad override)."""
        from hydra import compose

        from flowrl.config import to_train_config

        return to_train_config(compose(config_name="train", overrides=list(overrides)))


def base_eval_key(cfg) -> tuple[str, dict]:
    """Everything the base model's held-out evaluation depends on, and a short hash of it: pairs with the same key
    share one base evaluation."""
    m, t, s = cfg.model, cfg.trainer, cfg.sampler
    spec = {"model": {k: getattr(m, k) for k in ("family", "pretrained", "dtype", "load_t5", "max_sequence_length",
                                                   "resolution")},
            "test": cfg.data.test, "reward": {"name": cfg.reward.name, "args": dict(cfg.reward.args)},
            "eval_max_prompts": t.eval_max_prompts, "eval_images_per_prompt": t.eval_images_per_prompt,
            "eval_batch": t.eval_batch, "seed": t.seed, "eval_steps": s.eval_steps,
            "eval_guidance_scale": s.eval_guidance_scale, "mixed_precision": t.mixed_precision}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return key, spec


def plan(rules: list[Rule], samplers: tuple[str, ...], common: list[str], num_processes: int,
         selected) -> list[Row]:
    """Compose and validate every selected (rule, sampler) combination.

    Args:
        common: overrides of every pair (model, budget, extra ``--override``), applied after the pair's own.
        selected: ``(rule, sampler) -> bool``.

    Returns:
        One :class:`Row` per selected combination, ``planned`` or ``refused``.
    """
    from flowrl.config import ConfigError, validate

    rows = []
    with Composer() as comp:
        for rule in rules:
            for smp in samplers:
                if not selected(rule.name, smp):
                    continue
                row = Row(rule.name, smp, [*rule.overrides, f"sampler={smp}"])
                if rule.only_samplers is not None and smp not in rule.only_samplers:
                    row.status, row.refused_by, row.reason = "refused", "matrix", rule.only_reason
                    row.reason_full = rule.only_reason
                    rows.append(row)
                    continue
                try:
                    cfg = comp.compose([*row.overrides, *common])
                    validate(cfg, world_size=num_processes)
                except ConfigError as e:
                    row.status, row.refused_by = "refused", "validate" if "invalid configuration" in str(e) else "compose"
                    row.reason, row.reason_full = first_reason(str(e)), str(e)
                except Exception as e:  # a Hydra override error: the combination does not compose
                    row.status, row.refused_by = "refused", "compose"
                    row.reason, row.reason_full = first_reason(f"{type(e).__name__}: {e}"), f"{type(e).__name__}: {e}"
                else:
                    row._cfg = cfg
                    row.base_key = base_eval_key(cfg)[0]
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# running


@dataclass
class Measured:
    """A finished child process: exit code (negative = killed by that signal), wall seconds, peak RSS in MiB of its
    largest process (None where ``os.wait4`` is unavailable) and whether it was stopped by the timeout."""

    returncode: int
    wall_s: float
    peak_rss_mib: float | None
    timed_out: bool = False


def _kill_group(p: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate the child's process group (started with its own session), then kill it after ``grace`` seconds."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return
        if p.returncode is None:
            try:
                pid, status = os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid:  # the leader exited (reaped here); its children may linger
                p.returncode = os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_measured(cmd: list[str], stdout: Path, stderr: Path, env: dict, timeout: float = 0) -> Measured:
    """Run ``cmd`` (cwd = repository root, own process group), logs to files; wall time and peak RSS of this one
    child (``os.wait4``'s ``ru_maxrss``: the largest process of its tree, children reaped by it included).

    A timeout (seconds, 0 = none) or an interrupt of this script terminates the child's process group.
    """
    t0 = time.monotonic()
    with open(stdout, "wb") as fo, open(stderr, "wb") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                             start_new_session=True)
        if not hasattr(os, "wait4"):  # not POSIX: wall time only
            try:
                rc = p.wait(timeout=timeout or None)
                return Measured(rc, time.monotonic() - t0, None)
            except subprocess.TimeoutExpired:
                p.kill()
                return Measured(p.wait(), time.monotonic() - t0, None, timed_out=True)
        timed_out = False
        try:
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if timeout and time.monotonic() - t0 > timeout:
                    timed_out = True
                    _kill_group(p)
                    if p.returncode is not None:  # reaped inside _kill_group
                        p_ret = p.returncode
                        return Measured(p_ret, time.monotonic() - t0, None, timed_out=True)
                    pid, status, ru = os.wait4(p.pid, 0)
                    break
                time.sleep(0.25)
        except BaseException:
            _kill_group(p)
            if p.returncode is None:
                try:
                    os.wait4(p.pid, 0)
                except ChildProcessError:
                    pass
            p.returncode = -1
            raise
    p.returncode = os.waitstatus_to_exitcode(status)
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    return Measured(p.returncode, time.monotonic() - t0, ru.ru_maxrss * scale / 2**20, timed_out)


_EXC_LINE = re.compile(r"^(error:\s|([A-Za-z_]\w*\.)*[A-Za-z_]\w*(Error|Exception|Interrupt|Exit|Failure|Timeout)"
                       r"\b:?)")
_LAUNCHER = ("CalledProcessError", "returned non-zero exit status", "died with <Signals")


def last_error_line(text: str, returncode: int | None = None, limit: int = 240) -> str:
    """The most informative last error line of a run's stderr.

    The training process's own error (``error: ...`` from ``train_flowgrpo.py`` or a traceback's final
    ``SomeError: ...`` line) wins over the launcher's ``CalledProcessError`` that ``accelerate launch`` raises
    afterwards; then the launcher's line (it names a killing signal); then the last non-empty line (progress bars,
    split at carriage returns, count as lines); then the exit status.
    """
    lines = [seg.strip() for raw in text.splitlines() for seg in raw.split("\r")]
    lines = [l for l in lines if l]
    launcher = None
    for l in reversed(lines):
        if _EXC_LINE.match(l):
            if any(s in l for s in _LAUNCHER):
                launcher = launcher or l
                continue
            return l[:limit]
    if launcher:
        return launcher[:limit]
    if lines:
        return lines[-1][:limit]
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _failure(m: Measured, stderr: Path) -> str:
    """The reason of a failed child: timeout, killing signal or its last error line."""
    if m.timed_out:
        return f"timeout after {m.wall_s:.0f} s"
    text = stderr.read_text(errors="replace") if stderr.is_file() else ""
    line = last_error_line(text, m.returncode)
    if m.returncode < 0 and "killed" not in line:
        try:
            line = f"killed by {signal.Signals(-m.returncode).name}; {line}"
        except ValueError:
            pass
    return line


def score_of(summary: dict) -> tuple[str, float | None]:
    """The headline held-out score of an evaluation summary: ``overall`` (GenEval-style), else ``reward``."""
    for k in ("overall", "reward"):
        if isinstance(summary.get(k), (int, float)):
            return k, float(summary[k])
    return "", None


def child_env() -> dict:
    """Environment of the child processes: this one's, quiet tokenizers."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def evaluate_base(key: str, overrides: list[str], out: Path, timeout: float) -> dict:
    """Evaluate the base model once for evaluation setting ``key`` (a child process running the trainer's own
    held-out evaluation, LoRA disabled) in ``<out>/_base/<key>/``.

    Returns:
        ``{"key", "dir", "summary" (or None), "wall_s", "peak_rss_mib", "error" (or "")}``.
    """
    d = out / "_base" / key
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), INTERNAL_BASE_EVAL, str(d), "--", *overrides]
    (d / "command.txt").write_text(shlex.join(cmd) + "\n")
    m = run_measured(cmd, d / "stdout.log", d / "stderr.log", child_env(), timeout)
    f = d / "eval" / "base" / "summary.json"
    res = {"key": key, "dir": str(d), "summary": None, "wall_s": round(m.wall_s, 1),
           "peak_rss_mib": None if m.peak_rss_mib is None else round(m.peak_rss_mib, 1), "error": ""}
    if m.returncode == 0 and f.is_file():
        res["summary"] = json.loads(f.read_text())
    else:
        res["error"] = _failure(m, d / "stderr.log") if m.returncode else "no eval/base/summary.json written"
    return res


def _internal_base_eval(out_dir: str, overrides: list[str]) -> None:
    """Child mode: compose the pair's config, build a :class:`~flowrl.trainer.Trainer` and run its base held-out
    evaluation into ``<out_dir>/eval/base`` (identical to what ``trainer.eval_base=true`` would do)."""
    os.chdir(ROOT)
    with Composer() as comp:
        cfg = comp.compose([*overrides, f"trainer.output_dir={hydra_value(out_dir)}"])
    from flowrl.trainer import Trainer

    tr = Trainer(cfg)
    s = tr.evaluate_heldout("base", base=True)
    key, val = score_of(s)
    print(f"base {key}: {val}")


def run_pair(row: Row, common: list[str], base: dict, out: Path, num_processes: int, timeout: float) -> None:
    """Train one pair through ``accelerate launch`` (``trainer.eval_base=false``), copy the shared base summary
    into its ``eval/base/`` and fill ``row`` with scores, times and peak memory (or the failure)."""
    d = out / f"{row.rule}__{row.sampler}"
    shutil.rmtree(d, ignore_errors=True)  # never read a previous run's summaries
    d.mkdir(parents=True)
    row.run_dir = str(d)
    if base.get("summary") is None:
        row.status, row.reason = "failed", f"base evaluation: {base.get('error', 'missing')}"
        return
    cfg = row._cfg
    overrides = [*row.overrides, *common, f"trainer.output_dir={hydra_value(str(d))}", "trainer.eval_base=false"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", cfg.trainer.mixed_precision, "--dynamo_backend", "no",
           str(ROOT / "scripts" / "train_flowgrpo.py"), *overrides]
    (d / "matrix_command.txt").write_text(shlex.join(cmd) + "\n")
    m = run_measured(cmd, d / "matrix_stdout.log", d / "matrix_stderr.log", child_env(), timeout)
    row.returncode, row.wall_s = m.returncode, round(m.wall_s, 1)
    row.peak_rss_mib = None if m.peak_rss_mib is None else round(m.peak_rss_mib, 1)
    hist = d / "history.jsonl"
    if hist.is_file():
        try:
            hs = [json.loads(l) for l in hist.read_text().splitlines() if l.strip()]
            row.train_s = round(sum(h.get("time/rollout_s", 0.0) + h.get("time/update_s", 0.0) for h in hs), 1)
        except ValueError:
            pass
    trained = d / "eval" / "trained" / "summary.json"
    if m.returncode != 0:
        row.status, row.reason = "failed", _failure(m, d / "matrix_stderr.log")
        return
    if not trained.is_file():
        row.status, row.reason = "failed", "exit 0 but no eval/trained/summary.json"
        return
    after = json.loads(trained.read_text())
    (d / "eval" / "base").mkdir(parents=True, exist_ok=True)
    src = Path(base["dir"]) / "eval" / "base"
    for name in ("summary.json", "summary.md"):
        if (src / name).is_file():
            shutil.copy2(src / name, d / "eval" / "base" / name)
    (d / "eval" / "base" / "copied_from.txt").write_text(f"{src}\n(shared base evaluation, key {row.base_key})\n")
    try:
        from flowrl.evaluation import markdown_table

        (d / "eval" / "comparison.md").write_text(markdown_table({"base": base["summary"], "trained (EMA)": after}))
    except Exception:  # a summary without the usual keys: the table is a convenience only
        pass
    row.metric, row.before = score_of(base["summary"])
    _, row.after = score_of(after)
    if row.before is not None and row.after is not None:
        row.delta = round(row.after - row.before, 4)
    row.status = "ok"


# ----------------------------------------------------------------------------------------------------------------
# reports


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return p


def _cell(s: str, limit: int = 200) -> str:
    s = " ".join(str(s).split())
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|")


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def status_text(row: Row) -> str:
    """``ok`` / ``planned`` / ``refused: <reason>`` / ``failed: <reason>``."""
    return row.status if row.status in ("ok", "planned") else f"{row.status}: {row.reason}"


def markdown(rows: list[Row], meta: dict) -> str:
    """The matrix as a markdown document: how it was made, then one table row per combination."""
    b = meta["budget"]
    n = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "refused", "planned")}
    lines = ["# Verified matrix: update rule × sampler", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['environment']['cpu_count']} CPU cores, "
             f"{meta['environment']['platform']}, Python {meta['environment']['python']}). JSON: "
             f"`{_rel(meta['json'])}`.", "",
             f"Model `{meta['model']}`. Budget per pair: {b['epochs']} epochs of {b['groups']} prompts × "
             f"{b['group_size']} images ({b['train_steps']} sampling steps, `{next(o for o in meta['budget_overrides'] if o.startswith('trainer.micro_batch='))}`, "
             f"one optimizer step per epoch, trainer.threads={b['threads']}, {b['num_processes']} process(es)); "
             f"held-out evaluation on {b['eval_prompts'] or 'all'} prompts × {b['eval_images']} image(s), "
             f"{b['eval_steps']} ODE steps. Extra overrides: "
             f"{', '.join(f'`{o}`' for o in meta['extra_overrides']) or 'none'}.", "",
             "*before* / *after*: held-out score of the base model / the trained (EMA) LoRA "
             f"(`{meta.get('metric') or 'overall'}` of `eval/{{base,trained}}/summary.json`; the base is evaluated once "
             "per evaluation setting and shared). *wall*: the training process from launch to exit (start-up, "
             "training, trained evaluation); *train*: rollout + update seconds from `history.jsonl`; *peak RSS*: "
             "`ru_maxrss` of the pair's process tree (`os.wait4`). *refused* rows are combinations that "
             "`flowrl.config.validate` refuses (its first reason), or that this matrix does not run (`matrix:`).", "",
             f"**{n['ok']} ok, {n['failed']} failed, {n['refused']} refused"
             + (f", {n['planned']} planned (dry run)" if n["planned"] else "") + ".**", ""]
    for be in meta.get("base_evals", []):
        k, v = score_of(be["summary"] or {})
        lines.append(f"- base evaluation `{be['key']}`: {k or 'score'} {_num(v, '.4f')}, {be['wall_s']} s wall, "
                     f"peak RSS {_num(be['peak_rss_mib'], '.0f')} MiB"
                     + (f" — failed: {_cell(be['error'])}" if be["error"] else ""))
    if meta.get("base_evals"):
        lines.append("")
    lines += ["| rule | sampler | status | before | after | Δ | wall (s) | train (s) | peak RSS (MiB) | overrides |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.rule} | {r.sampler} | {_cell(status_text(r))} | {_num(r.before, '.3f')} | "
                     f"{_num(r.after, '.3f')} | {_num(r.delta, '+.3f')} | {_num(r.wall_s, '.1f')} | "
                     f"{_num(r.train_s, '.1f')} | {_num(r.peak_rss_mib, '.0f')} | "
                     f"{_cell(' '.join(r.overrides), 400)} |")
    return "\n".join(lines) + "\n"


def write_reports(rows: list[Row], meta: dict, md_path: Path | None) -> None:
    """Write ``matrix.json`` (``meta['json']``) and, unless ``md_path`` is None, the markdown table."""
    data = {**meta, "rows": [r.public() for r in rows],
            "counts": {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "refused", "planned")}}
    Path(meta["json"]).parent.mkdir(parents=True, exist_ok=True)
    Path(meta["json"]).write_text(json.dumps(data, indent=2, default=str) + "\n")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(rows, meta))


# ----------------------------------------------------------------------------------------------------------------
# command line


def parse_pairs(spec: str | None, rules: list[Rule]):
    """``--pairs`` (``rule:sampler`` items, comma-separated, fnmatch patterns) as a predicate.

    Raises:
        SystemExit(2): an item without ``:`` or one that matches no combination (the message lists the names).
    """
    if not spec:
        return lambda r, s: True
    items = []
    for it in (x.strip() for x in spec.split(",") if x.strip()):
        if it.count(":") != 1:
            raise SystemExit(f"error: --pairs item {it!r} is not rule:sampler")
        items.append(tuple(it.split(":")))
    names = [r.name for r in rules]
    for rp, sp in items:
        if not any(fnmatch.fnmatchcase(r, rp) for r in names) or not any(fnmatch.fnmatchcase(s, sp) for s in SAMPLERS):
            print(f"error: --pairs item {rp}:{sp} matches nothing; rules: {', '.join(names)}; samplers: "
                  f"{', '.join(SAMPLERS)}", file=sys.stderr)
            raise SystemExit(2)
    return lambda r, s: any(fnmatch.fnmatchcase(r, rp) and fnmatch.fnmatchcase(s, sp) for rp, sp in items)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Budget()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-sd3", help="model folder or hub id (model.pretrained; "
                   "default %(default)s)")
    p.add_argument("--pairs", help="comma-separated rule:sampler patterns, e.g. flow_grpo:cps,nft:ode or 'flow_grpo*:sde'")
    p.add_argument("--epochs", type=int, default=d.epochs, help="trainer.epochs (default %(default)s)")
    p.add_argument("--groups", type=int, default=d.groups, help="trainer.groups_per_epoch (default %(default)s)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="trainer.group_size (default %(default)s)")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts,
                   help="trainer.eval_max_prompts, 0 = all held-out prompts (default %(default)s)")
    p.add_argument("--eval-images", type=int, default=d.eval_images,
                   help="trainer.eval_images_per_prompt (default %(default)s)")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="sampler.train_steps (default %(default)s)")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="sampler.eval_steps (default %(default)s)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="trainer.micro_batch; 0 = largest divisor ≤ 16 of the samples per rank (default)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="trainer.threads: torch CPU threads per run, 0 = all cores (default %(default)s)")
    p.add_argument("--num-processes", type=int, default=d.num_processes,
                   help="accelerate launch --num_processes (default %(default)s)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every pair, e.g. model=sd3_5_medium (repeatable)")
    p.add_argument("--out", default="runs/matrix", help="run folders, matrix.json (default %(default)s)")
    p.add_argument("--md", default="docs/matrix.md", help="markdown table (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run, 0 = none (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="list pairs and refusals, train nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the matrix (or the dry run); returns the exit status (1 if any pair failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [INTERNAL_BASE_EVAL]:
        _internal_base_eval(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = Budget(a.epochs, a.groups, a.group_size, a.eval_prompts, a.eval_images, a.train_steps, a.eval_steps,
                    a.micro_batch, a.threads, a.num_processes)
    out = Path(a.out).resolve()
    md_path = Path(a.md) if Path(a.md).is_absolute() else (Path.cwd() / a.md)
    model = resolve_model(a.model)
    common = [f"model.pretrained={hydra_value(model)}", *budget.overrides(), *a.override]
    rules = update_rules()
    selected = parse_pairs(a.pairs, rules)
    rows = plan(rules, SAMPLERS, common, a.num_processes, selected)
    if not rows:
        print("error: no pair selected", file=sys.stderr)
        return 2
    import torch

    meta = {"command": shlex.join(["python", "scripts/verified_matrix.py", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": model, "budget": asdict(budget),
            "budget_overrides": budget.overrides(), "extra_overrides": a.override,
            "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__},
            "json": str(out / ("plan.json" if a.dry_run else "matrix.json")), "base_evals": [], "metric": ""}
    todo = [r for r in rows if r.status == "planned"]
    if a.dry_run:
        write_reports(rows, meta, None)
        print(markdown(rows, meta))
        print(f"dry run: {len(todo)} pairs to run, {len(rows) - len(todo)} refused; plan written to {meta['json']}")
        return 0

    bases: dict[str, dict] = {}
    t_start = time.monotonic()
    print(f"verified matrix: {len(todo)} pairs to run, {len(rows) - len(todo)} refused; model {model}", flush=True)
    try:
        for i, row in enumerate(todo, 1):
            if row.base_key not in bases:
                print(f"base evaluation {row.base_key} ...", flush=True)
                bases[row.base_key] = evaluate_base(row.base_key, [*row.overrides, *common], out, a.timeout)
                be = bases[row.base_key]
                meta["base_evals"] = list(bases.values())
                print(f"  {'failed: ' + be['error'] if be['error'] else score_of(be['summary'])} "
                      f"({be['wall_s']} s)", flush=True)
            print(f"[{i}/{len(todo)}] {row.label} ...", flush=True)
            run_pair(row, common, bases[row.base_key], out, a.num_processes, a.timeout)
            meta["metric"] = meta["metric"] or row.metric
            print(f"  {status_text(row)}; before {_num(row.before, '.3f')} after {_num(row.after, '.3f')}, "
                  f"{_num(row.wall_s, '.1f')} s, peak {_num(row.peak_rss_mib, '.0f')} MiB", flush=True)
            meta["wall_s_total"] = round(time.monotonic() - t_start, 1)
            write_reports(rows, meta, md_path)
    except KeyboardInterrupt:
        for row in todo:
            if row.status == "planned":
                row.status, row.reason = "failed", "interrupted"
        meta["wall_s_total"] = round(time.monotonic() - t_start, 1)
        write_reports(rows, meta, md_path)
        print("interrupted; partial results written", file=sys.stderr)
        return 130
    meta["wall_s_total"] = round(time.monotonic() - t_start, 1)
    write_reports(rows, meta, md_path)
    failed = [r for r in rows if r.status == "failed"]
    print(f"\nwritten: {md_path}, {meta['json']} ({meta['wall_s_total']} s)")
    print(f"verified matrix: {sum(r.status == 'ok' for r in rows)} ok, {len(failed)} failed, "
          f"{sum(r.status == 'refused' for r in rows)} refused")
    for r in failed:
        print(f"  failed {r.label}: {r.reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
