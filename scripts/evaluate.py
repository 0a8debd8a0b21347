"""Evaluate the base model and/or LoRA checkpoints on a text-to-image benchmark (ODE sampling, fixed seeds).

    python scripts/evaluate.py                                   # embedded base model on the held-out shapes prompts
    python scripts/evaluate.py --lora runs/flowgrpo/checkpoints/final/lora_ema --out runs/eval/trained
                                                                 # base + the trained LoRA side by side
    python scripts/evaluate.py --no-base --lora runs/flowgrpo/checkpoints/final/lora_ema --out runs/eval/trained
                                                                 # the LoRA alone (the classic single-model layout)
    python scripts/evaluate.py --checkpoint grpo=runs/a/checkpoints/final --checkpoint dpo=runs/b/checkpoints/final \\
        --out runs/eval/compare                                  # named checkpoints (lora_ema/ or lora/ inside)
    python scripts/evaluate.py --checkpoint full=runs/c/checkpoints/final   # full fine-tuning (transformer_ema/ inside)
    python scripts/evaluate.py --prompts drawbench.csv --reward clip_score --reward aesthetic
    python scripts/evaluate.py --prompts ocr_test.txt --reward <an OCR reward reading metadata["text"]>
    python scripts/evaluate.py --prompts prompts.txt --reward 'clip_score={"model": "openai/clip-vit-base-patch32"}'
    python scripts/evaluate.py --model stabilityai/stable-diffusion-3.5-medium --t5 --max-sequence-length 256 \\
        --resolution 512 --metadata data/geneval/evaluation_metadata.jsonl --reward <real-image GenEval reward>

Prompt files (kind auto-detected, ``--kind`` overrides): GenEval metadata JSON lines (``tag``/``include``; strict
and partial score per task), OCR prompts (one per line or JSON lines / CSV, the text to render in double quotes:
``A sign that says "HELLO"``; the quoted text is passed to the reward as ``metadata["text"]``) and plain prompt lists
(DrawBench style: ``.txt`` one prompt per line, or CSV / JSON lines with a ``prompt`` / ``Prompts`` column and an
optional ``category``). ``--reward`` may be repeated or comma-separated, each ``NAME`` or ``NAME={json args}``;
every reward's mean, overall and per task / category, is reported. GenEval files default to ``geneval_shapes``.

Models: ``base`` (the ``--model`` weights) unless ``--no-base``, then every ``--lora PATH`` / ``--checkpoint
[NAME=]PATH`` in the order given, all on the same prompts and seeds: image ``k`` of prompt ``i`` uses seed
``seed + i·N + k`` for every model. A checkpoint folder holding ``lora_ema/`` (preferred) or ``lora/`` is accepted,
and so is a full fine-tuning checkpoint (``model.lora_rank=0``): a folder holding ``transformer_ema/`` (preferred) or
``transformer/``, or such a diffusers transformer folder itself (``config.json`` +
``diffusion_pytorch_model*.safetensors``); its transformer replaces the base model's for that evaluation.

One model: ``--out`` receives ``results.jsonl`` (per image), ``summary.json``, ``summary.md``, ``grid.png``,
``report.html`` and the official GenEval folder layout ``images/<NNNNN>/{metadata.jsonl,samples/<dddd>.png}``; the
last line printed is the overall score (``overall: x``, or ``reward: x`` for the primary reward of a non-GenEval
file). Several models: one such folder per model in ``--out/<label>/``, plus ``comparison.md``,
``comparison.json`` and ``report.html`` (tables with one column per model and the difference vs base, largest
per-prompt changes, samples side by side, grids); the last lines printed are ``overall[<label>]: x`` per model.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn


class _AddModel(argparse.Action):
    """``--lora PATH`` and ``--checkpoint [NAME=]PATH`` append ``(name or None, path)`` to one ordered list."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = list(getattr(namespace, self.dest, None) or [])
        name, path = None, value
        if option_string == "--checkpoint" and "=" in value:
            left, _, right = value.partition("=")
            if left and "/" not in left and "\\" not in left:
                name, path = left, right
        models.append((name, path))
        setattr(namespace, self.dest, models)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/shapes-sd3", help="diffusers folder or hub id of the base model")
    p.add_argument("--lora", dest="models", action=_AddModel, metavar="PATH",
                   help="LoRA folder saved by training (pipeline.load_lora_weights format); repeatable")
    p.add_argument("--checkpoint", dest="models", action=_AddModel, metavar="[NAME=]PATH",
                   help="a LoRA or training-checkpoint folder, optionally labelled; repeatable")
    p.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    p.add_argument("--metadata", "--prompts", dest="metadata", metavar="FILE",
                   default="assets/prompts/shapes_test.jsonl",
                   help="prompt file: GenEval metadata .jsonl, OCR prompts, or a plain .txt/.csv/.jsonl prompt list")
    p.add_argument("--kind", choices=["geneval", "ocr", "plain"], default=None,
                   help="prompt-file kind (default: detected from the file)")
    p.add_argument("--reward", action="append", default=None, metavar="NAME[={json}]",
                   help="registered reward, optionally with JSON constructor args; repeatable or comma-separated "
                        "(default for GenEval files: geneval_shapes)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-sequence-length", type=int, default=0)
    p.add_argument("--t5", action="store_true", help="load the T5 encoder (real SD3/SD3.5 checkpoints)")
    p.add_argument("--max-prompts", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/base for the base model alone, "
                                               "runs/eval/<label> for one checkpoint, runs/eval/compare for several)")
    return p


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def _is_transformer_folder(p: Path) -> bool:
    """A diffusers model folder (full fine-tuning checkpoint): ``config.json`` and ``diffusion_pytorch_model*``."""
    return (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*.safetensors"))


def full_location(path: str) -> tuple[Path, str] | None:
    """``(transformer folder, note)`` when ``path`` is a full fine-tuning checkpoint: a transformer folder itself, or
    a training checkpoint holding ``transformer_ema/`` (preferred) or ``transformer/``; None otherwise."""
    p = Path(path)
    if p.is_dir() and _is_transformer_folder(p):
        return p, ""
    for sub in ("transformer_ema", "transformer"):
        if (p / sub).is_dir() and _is_transformer_folder(p / sub):
            return p / sub, f"{path}: using its {sub}/ (full fine-tuning)"
    return None


def _lora_location(path: str) -> tuple[Path, str | None, str]:
    """``(folder, weight file name or None, note)`` of the LoRA weights named by ``path``.

    Raises:
        FileNotFoundError: no such folder, or a folder without LoRA weights.
    """
    p = Path(path)
    if p.is_file() and p.suffix in (".safetensors", ".bin"):
        return p.parent, p.name, ""
    if not p.is_dir():
        raise FileNotFoundError(f"LoRA folder {path} not found")
    if any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
        return p, None, ""
    for sub in ("lora_ema", "lora"):
        if (p / sub).is_dir() and (any((p / sub).glob("*.safetensors")) or any((p / sub).glob("*.bin"))):
            return p / sub, None, f"{path}: using its {sub}/"
    raise FileNotFoundError(f"LoRA folder {path} holds no LoRA weights (*.safetensors) and no lora_ema/ or lora/ "
                            "subfolder with them (nor transformer_ema/ or transformer/ of full fine-tuning)")


def resolve_models(specs: list[tuple[str | None, str]], with_base: bool) -> list[dict]:
    """``[{"label", "path", "lora", "full", "weight_name", "note"}]``: ``base`` first (``lora`` and ``full`` None),
    then the checkpoints: a LoRA (``lora`` its folder) or a full fine-tuning checkpoint (``full`` its transformer
    folder, :func:`full_location`).

    Raises:
        FileNotFoundError: a missing LoRA folder. ValueError: duplicate / reserved labels, or nothing to evaluate.
    """
    models = ([{"label": "base", "path": None, "lora": None, "full": None, "weight_name": None, "note": ""}]
              if with_base else [])
    taken = {m["label"] for m in models}
    for name, path in specs:
        full = full_location(path)
        if full is not None:
            folder, weight_name, note = None, None, full[1]
        else:
            folder, weight_name, note = _lora_location(path)
        if name is not None:
            label = _label(name)
            if label in taken:
                raise ValueError(f"--checkpoint {name}={path}: the label {label!r} is already used"
                                 + (" (base is the base model; --no-base leaves it out)" if label == "base" else ""))
        else:
            p = Path(path).resolve()
            candidates = [_label(p.name), _label(f"{p.parent.name}_{p.name}"),
                          _label(f"{p.parent.parent.name}_{p.parent.name}_{p.name}")]
            label = next((c for c in candidates if c not in taken), None)
            k = 2
            while label is None:
                label = f"{candidates[0]}_{k}" if f"{candidates[0]}_{k}" not in taken else None
                k += 1
        taken.add(label)
        models.append({"label": label, "path": path, "lora": folder, "full": full[0] if full else None,
                       "weight_name": weight_name, "note": note})
    if not models:
        raise ValueError("nothing to evaluate: --no-base needs at least one --lora or --checkpoint")
    return models


def load_full_transformer(adapter, folder: Path):
    """The fully fine-tuned transformer saved in ``folder`` as the base model's class, in the adapter's dtype and on
    its device.

    Raises:
        ValueError: the folder holds another model class (e.g. a FLUX transformer for an SD3 base model).
    """
    import json

    base_cls = type(adapter.transformer)
    saved = json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    if saved != base_cls.__name__:
        raise ValueError(f"it holds a {saved}, but the base model --model has a {base_cls.__name__}")
    return base_cls.from_pretrained(str(folder), torch_dtype=adapter.dtype).to(adapter.device).requires_grad_(False)


def _fail(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    import numpy as np

    from flowrl.prompt_sets import load_prompt_set

    # -- everything that can be checked before loading the model ----------------------------------------------------
    try:
        prompt_set = load_prompt_set(a.metadata, a.kind)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    records = prompt_set.records[: a.max_prompts] if a.max_prompts else prompt_set.records
    reward_values = a.reward
    if not reward_values:
        if prompt_set.kind != "geneval":
            hint = ("an OCR reward that reads metadata['text']" if prompt_set.kind == "ocr"
                    else "e.g. --reward clip_score --reward aesthetic")
            _fail(f"{prompt_set.path} is a {prompt_set.kind} prompt file ({prompt_set.reason}); choose its rewards "
                  f"with --reward ({hint})")
        reward_values = ["geneval_shapes"]
    from contextlib import nullcontext

    from flowrl.evaluation import evaluate_benchmark, load_rewards, parse_reward_specs
    from flowrl.models.sd3 import SD3Adapter, resolve_model_path, swapped_denoiser

    try:
        specs = parse_reward_specs(reward_values)
        models = resolve_models(a.models or [], with_base=not a.no_base)
        resolve_model_path(a.model)
        rewards = load_rewards(specs)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        _fail(_message(e))
    probe = np.full((1, a.resolution, a.resolution, 3), 127, dtype=np.uint8)
    for label, fn in rewards.rewards.items():  # a reward that cannot read these prompts fails now, not after sampling
        try:
            fn(probe, [records[0]["prompt"]], [records[0]])
        except Exception as e:  # noqa: BLE001 - any failure of a plugin is reported the same way
            _fail(f"reward {label!r} cannot score {prompt_set.kind} prompts from {prompt_set.path}: {_message(e)}")

    try:
        adapter = SD3Adapter.from_pretrained(a.model, max_sequence_length=a.max_sequence_length, load_t5=a.t5)
    except (FileNotFoundError, ValueError, OSError) as e:
        _fail(str(e))

    single = len(models) == 1
    out = Path(a.out or ("runs/eval/base" if models[0]["label"] == "base" else f"runs/eval/{models[0]['label']}")
               if single else a.out or "runs/eval/compare")
    n = a.images_per_prompt
    print(f"prompts: {prompt_set.path} — {len(records)} prompts, kind {prompt_set.kind} ({prompt_set.reason})")
    print(f"rewards: {', '.join(rewards.labels)}; models: {', '.join(m['label'] for m in models)}; "
          f"seeds {a.seed} + i·{n} + k")
    for m in models:
        if m["note"]:
            print(m["note"])

    from diffusers.utils import logging as dlogging

    summaries, kw = {}, dict(kind=prompt_set.kind, reward_columns=rewards.columns, group_key=prompt_set.group_key,
                             images_per_prompt=n, steps=a.steps, guidance_scale=a.cfg, resolution=a.resolution,
                             seed=a.seed, batch=a.batch, progress=True)
    for j, m in enumerate(models):
        folder = out if single else out / m["label"]
        m["dir"] = folder
        if m["lora"] is not None:
            verbosity = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # "no LoRA keys for the text encoders" is expected for transformer LoRAs
            try:
                adapter.pipeline.load_lora_weights(str(m["lora"]), adapter_name=f"eval_{j}",
                                                   **({"weight_name": m["weight_name"]} if m["weight_name"] else {}))
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                _fail(f"cannot load LoRA {m['path']}: {e}")
            finally:
                dlogging.set_verbosity(verbosity)
        swap = nullcontext()
        if m["full"] is not None:
            try:
                swap = swapped_denoiser(adapter, load_full_transformer(adapter, m["full"]))
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                _fail(f"cannot load the fine-tuned transformer {m['full']}: {e}")
        try:
            with swap:
                summaries[m["label"]] = evaluate_benchmark(adapter, records, rewards, out_dir=folder,
                                                           desc=f"[{j + 1}/{len(models)}] {m['label']}", **kw)
        finally:
            if m["lora"] is not None:
                adapter.pipeline.unload_lora_weights()

    from flowrl.eval_report import write_report

    settings = {"prompt file": str(prompt_set.path), "kind": f"{prompt_set.kind} ({prompt_set.reason})",
                "prompts": len(records), "images per prompt": n, "steps (ODE)": a.steps, "CFG": a.cfg,
                "resolution": a.resolution, "seeds": f"{a.seed} + i·{n} + k (image k of prompt i, every model)",
                "rewards": ", ".join(reward_values), "base model": a.model}
    report_models = [{"label": m["label"], "path": m["path"] or a.model, "dir": m["dir"]} for m in models]
    write_report(out, report_models, {k: s["benchmark"] for k, s in summaries.items()}, settings=settings,
                 base="base" if not a.no_base else None, comparison=not single,
                 title=f"Benchmark evaluation: {prompt_set.path.name}")
    key = "overall" if prompt_set.kind == "geneval" else "reward"
    if single:
        s = summaries[models[0]["label"]]
        print((out / "summary.md").read_text())
        print(f"report: {out / 'report.html'}")
        print(f"{key}: {s[key]:.4f}")
    else:
        print((out / "comparison.md").read_text())
        print(f"report: {out / 'report.html'}")
        for label, s in summaries.items():
            print(f"{key}[{label}]: {s[key]:.4f}")
    return summaries


if __name__ == "__main__":
    main()
