"""RPO: subject-driven fine-tuning with λ-Harmonic preferences against reference images (``algorithm=rpo``).

Miao et al. 2024, "Subject-driven Text-to-Image Generation via Preference-based Reinforcement Learning" (NeurIPS 2024,
arXiv 2407.12164; ``shared/REFERENCE.md`` §4). A handful of reference images show a *subject*; prompts name it with a
rare token (``"a photo of a sks star left of a blue circle"``). Each epoch:

1. **Generate** with the current policy: ``trainer.groups_per_epoch`` subject prompts (the ``train`` split of
   ``algorithm.rpo_prompts``) × ``trainer.group_size`` images, with the trainer's own rollout
   (:meth:`flowrl.trainer.Trainer.rollout`: ``sampler.*``, ``sampler.train_steps`` steps, CFG
   ``sampler.guidance_scale``; use ``sampler=ode`` for the deterministic sampler), scored by the λ-Harmonic reward.
2. **Pair** every generated image ``i`` (global sample index ``i`` of the epoch) with reference image ``k = i mod K``.
   Both are scored against the generated image's prompt ``c_i``: ``R_gen = H_λ(x_i, c_i)``, ``R_ref = H_λ(ref_k, c_i)``
   (:func:`lambda_harmonic`, with ``λ = algorithm.rpo_label_lambda``, default ``algorithm.rpo_lambda``).
3. **Label** (Bradley–Terry on the λ-Harmonic reward): the reference is preferred with probability
   ``p_i = σ(R_ref - R_gen)``; the label is a Bernoulli draw, ``y_i = 1`` (reference wins) iff ``u_i < p_i`` with
   ``u_i ~ U(0, 1)`` from a generator seeded by ``(trainer.seed, epoch, sample i)`` — independent of ranks and
   micro-batching (:func:`draw_preference_labels`). With ``y_i = 0`` the generated image is the winner.
4. **Loss** per pair, on one forward-process draw shared by both images (σ logit-normal with the SD3 shift and one
   noise ``ε``, as :meth:`~flowrl.trainer.Trainer.update_dpo`; :func:`~flowrl.core.dpo.dpo_noisy_pair`):

   * the Diffusion-DPO loss on velocity errors (:func:`~flowrl.core.dpo.diffusion_dpo_loss`, ``β =
     algorithm.dpo_beta``; policy = LoRA on, reference policy = LoRA disabled; conditional velocities, CFG 1) with the
     winner/loser order given by ``y_i``;
   * plus ``algorithm.rpo_recon_weight ×`` the flow-matching reconstruction loss of the reference image,
     ``mean_dims((v_θ(x_σ^ref, σ, c_inst) - (ε - x0^ref))²)`` (DreamBooth's instance loss).

   The reference image is conditioned on the instance prompt ``algorithm.rpo_instance_prompt`` (``"a photo of a sks
   star"``), the generated image on its own prompt ``c_i`` — as the authors' training script pairs them; the
   λ-Harmonic scores of both use ``c_i``. Both terms are summed over pairs and divided by the number of pairs of the
   optimizer step on all ranks (gradients are all-reduced with a mean), so the update does not depend on the number
   of ranks or on ``trainer.micro_batch``. At the first step (LoRA ``B = 0``) the policy equals the reference: every
   pair's preference loss is ``log 2`` and the loss is ``log 2 + w · recon``.
5. **Early stopping** (the paper's validation with the λ-Harmonic reward): every ``algorithm.rpo_eval_every`` epochs
   the mean λ-Harmonic score (``λ = algorithm.rpo_lambda``) of ``algorithm.rpo_val_images`` ODE images per ``val``
   prompt (``sampler.eval_steps`` steps, CFG ``sampler.eval_guidance_scale``, fixed seeds; the EMA weights when the
   trainer keeps an EMA, as its held-out evaluation) is computed; an improvement saves ``checkpoints/best``
   (:meth:`~flowrl.trainer.Trainer.save`), and training stops after ``algorithm.rpo_patience`` evaluations in a row
   without one (:class:`EarlyStopping`). Logged as ``rpo/harmonic``, ``rpo/s_img``, ``rpo/s_txt`` (and
   ``rpo/harmonic_base``, the base model's score, at the first evaluation).

Similarities (:class:`LambdaHarmonic`, CLIP of ``reward.args.model``): ``s_img`` = the mean cosine between the image's
CLIP embedding and the reference images' embeddings, ``s_txt`` = the cosine between the image and the prompt with the
subject token removed (``"a photo of a star left of a blue circle"``: CLIP does not know the token; the authors also
strip it), each mapped to [0, 1] by ``max(cos, 0)`` (default; CLIPScore's clipping at 0, Hessel et al. 2021 — the
paper's ALIGN cosines are positive in practice) or ``(1 + cos)/2`` (``mapping="affine"``).

Deviations from the paper, on purpose: LoRA on the flow transformer (the paper trains the SD UNet); the velocity target
``ε - x0`` in place of ε; CLIP in place of ALIGN; the generated images are drawn fresh every epoch from the current
policy (the official implementation generates them once, before training).
"""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowrl.config import ConfigError

RPO_SEED_OFFSET = 1 << 45  # seeds of RPO's forward-process draws (one generator per pair)
RPO_LABEL_OFFSET = 1 << 46  # seeds of RPO's preference-label draws (one generator per pair)
RPO_VAL_SEED = 20_000  # validation image k of prompt i: seed RPO_VAL_SEED + trainer.seed + i·V + k
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAPPINGS = ("clamp", "affine")


# -- the λ-Harmonic reward ------------------------------------------------------------------------------------------
def lambda_harmonic(s_img, s_txt, lam: float):
    """The λ-Harmonic reward (Miao et al. 2024, arXiv 2407.12164): the weighted harmonic mean

        ``R = 1 / (λ / s_img + (1 - λ) / s_txt)``

    of the image-to-reference similarity ``s_img`` and the text-to-image similarity ``s_txt``. A harmonic mean is
    high only when both are: an image that copies the references but ignores the prompt (or the reverse) scores low.

    Limits: ``λ = 1`` gives ``s_img``, ``λ = 0`` gives ``s_txt``, equal similarities ``s`` give ``s`` for every λ, and a
    zero similarity with a positive weight gives ``R = 0`` (the limit of the formula).

    Args:
        s_img, s_txt: similarities in [0, 1], floats or array-likes of one shape (broadcastable).
        lam: λ in [0, 1] (``algorithm.rpo_lambda``: 0.3, the official code's default, ``configs/algorithm/rpo.yaml``).

    Returns:
        ``R`` in [0, 1]: a float for scalar inputs, else a float64 ``np.ndarray`` of the broadcast shape.

    Raises:
        ValueError: λ outside [0, 1], or a similarity outside [0, 1] or NaN.
    """
    if not (isinstance(lam, (int, float)) and 0.0 <= float(lam) <= 1.0):
        raise ValueError(f"λ must be in [0, 1], got {lam!r}")
    a = np.asarray(s_img, dtype=np.float64)
    b = np.asarray(s_txt, dtype=np.float64)
    for name, s in (("s_img", a), ("s_txt", b)):
        if np.isnan(s).any() or (s < 0).any() or (s > 1).any():
            raise ValueError(f"{name} must lie in [0, 1], got {s.tolist() if s.size < 9 else s}")
    lam = float(lam)
    a, b = np.broadcast_arrays(a, b)
    if lam == 0.0 or lam == 1.0:  # exact endpoints (no 1/(1/s) rounding)
        r = (b if lam == 0.0 else a).astype(np.float64, copy=True)
    else:
        with np.errstate(divide="ignore"):
            inv = lam / a + (1 - lam) / b
        r = np.where(np.isinf(inv), 0.0, 1.0 / inv)
    return float(r) if r.ndim == 0 else r


def map_similarity(cos, mapping: str = "clamp"):
    """Cosine similarities ``[-1, 1]`` → [0, 1]: ``max(cos, 0)`` (``"clamp"``) or ``(1 + cos) / 2`` (``"affine"``).

    Accepts a float, an array-like or a tensor and returns the same kind (values clipped to [0, 1] against rounding).

    Raises:
        ValueError: an unknown ``mapping``.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown similarity mapping {mapping!r}; choose one of {MAPPINGS}")
    if isinstance(cos, torch.Tensor):
        out = cos.clamp(min=0) if mapping == "clamp" else (1 + cos) / 2
        return out.clamp(0, 1)
    c = np.asarray(cos, dtype=np.float64)
    out = np.clip(c if mapping == "clamp" else (1 + c) / 2, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def strip_subject_token(prompt: str, token: str) -> str:
    """``prompt`` without the subject token (whole words only), spaces collapsed: ``"a photo of a sks star"`` →
    ``"a photo of a star"``. An empty ``token`` returns the prompt unchanged."""
    if not token:
        return prompt
    out = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", prompt)
    return re.sub(r"\s+", " ", out).strip()


def has_token(prompt: str, token: str) -> bool:
    """Whether ``token`` occurs in ``prompt`` as a whole (whitespace-separated) word."""
    return bool(token) and token in prompt.split()


def find_reference_images(spec: str | Path) -> list[Path]:
    """The reference image files of ``spec``: a folder (its ``.png/.jpg/.jpeg/.webp/.bmp`` files), a glob pattern
    (e.g. ``assets/rpo_subject/*.png``) or one image file; sorted by path.

    Raises:
        FileNotFoundError: no image found, with what ``spec`` has to be.
    """
    spec = str(spec)
    p = Path(spec)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    elif any(ch in spec for ch in "*?["):
        files = [Path(f) for f in glob.glob(spec) if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        files = [p]
    else:
        files = []
    if not files:
        raise FileNotFoundError(
            f"no reference images found at algorithm.rpo_references={spec!r}: give a folder of .png/.jpg images, a "
            "glob such as 'assets/rpo_subject/*.png' or an image file (the example subject is rendered by "
            "`python scripts/make_rpo_example.py` into assets/rpo_subject/)")
    return sorted(files)


def _looks_local(model: str) -> bool:
    """Whether a ``model`` string names a local folder (absolute, ``./``/``../`` or under an existing local folder)
    rather than a hub id such as ``openai/clip-vit-large-patch14``."""
    p = Path(model)
    return p.is_absolute() or model.startswith((".", "~")) or (len(p.parts) > 1 and Path(p.parts[0]).is_dir())


def check_clip_model(model: str | None) -> None:
    """Refuse a missing CLIP for the λ-Harmonic reward before anything is loaded.

    Raises:
        FileNotFoundError: ``model`` is empty, or names a local folder that does not exist (e.g. the embedded
            ``assets/shapes-clip`` before ``scripts/pretrain_clip.py`` has written it).
    """
    if not model:
        raise FileNotFoundError("reward=lambda_harmonic needs a CLIP model: set reward.args.model to a local CLIP "
                                "folder (e.g. assets/shapes-clip) or a hub id (e.g. openai/clip-vit-large-patch14)")
    if _looks_local(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(
            f"the λ-Harmonic reward's CLIP model {model!r} does not exist (reward.args.model). The embedded shapes "
            "CLIP is written to assets/shapes-clip by `python scripts/pretrain_clip.py`; or point reward.args.model "
            "at another CLIPModel folder or hub id")


def _load_uint8(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


class LambdaHarmonic:
    """λ-Harmonic reward plugin (``reward=lambda_harmonic``; Miao et al. 2024, arXiv 2407.12164).

    For uint8 images ``[B, H, W, 3]`` and their prompts: ``s_img`` = ``map(mean_k cos(E(x), E(ref_k)))`` over the K
    reference images, ``s_txt`` = ``map(cos(E(x), T(prompt without the subject token)))``, ``reward`` =
    :func:`lambda_harmonic` ``(s_img, s_txt, lam)``; ``map`` is :func:`map_similarity`. Embeddings come from a frozen
    ``transformers.CLIPModel`` (:class:`flowrl_rewards._clip_common.ClipEmbedder`, the CLIPScore machinery).

    Args:
        references: folder / glob / file of the reference images (:func:`find_reference_images`); with
            ``algorithm=rpo`` it is ``algorithm.rpo_references`` (``configs/reward/lambda_harmonic.yaml``).
        model: CLIP folder or hub id (default ``assets/shapes-clip``, the embedded shapes CLIP).
        processor: where the ``CLIPProcessor`` lives if not beside the model.
        lam: λ in [0, 1] (default 0.3). subject_token: removed from prompts before text encoding (default ``sks``).
        mapping: ``"clamp"`` (``max(cos, 0)``, default) or ``"affine"`` (``(1 + cos)/2``).
        device, dtype, batch_size: as :class:`flowrl_rewards.clip_score.CLIPScore`.

    Call: returns float32 ``[B]`` columns ``reward`` (in [0, 1]), ``s_img`` and ``s_txt`` (in [0, 1]); ``metadata`` is
    ignored.

    Raises:
        FileNotFoundError: no reference image, or a local CLIP folder that does not exist (:func:`check_clip_model`).
        ValueError: λ outside [0, 1], an unknown mapping or ``batch_size < 1``; at call time images not uint8
            ``[B, H, W, 3]`` or a prompt count other than B.
        ImportError / OSError: as :class:`~flowrl_rewards._clip_common.ClipEmbedder`.
    """

    name = "lambda_harmonic"

    def __init__(self, references: str, model: str = "assets/shapes-clip", processor: str | None = None,
                 lam: float = 0.3, subject_token: str = "sks", mapping: str = "clamp", device=None,
                 dtype="float32", batch_size: int = 32):
        from flowrl_rewards._clip_common import ClipEmbedder

        if not (isinstance(lam, (int, float)) and 0.0 <= float(lam) <= 1.0):
            raise ValueError(f"reward 'lambda_harmonic': lam={lam!r} must be in [0, 1]")
        if mapping not in MAPPINGS:
            raise ValueError(f"reward 'lambda_harmonic': mapping={mapping!r}; choose one of {MAPPINGS}")
        if batch_size < 1:
            raise ValueError(f"reward 'lambda_harmonic': batch_size must be ≥ 1 (got {batch_size})")
        self.reference_paths = find_reference_images(references)
        check_clip_model(model)
        self.lam, self.subject_token, self.mapping = float(lam), str(subject_token or ""), mapping
        self.batch_size = int(batch_size)
        self.embedder = ClipEmbedder(model, processor or model, device, dtype, self.name)
        # one reference at a time: the files may differ in size (the processor resizes each)
        self.ref_embeds = torch.cat([self.embedder.image_embeds(_load_uint8(p)[None])
                                     for p in self.reference_paths])  # [K, D], unit norm

    def cosines(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw cosines ``(mean_k cos(E(x), E(ref_k)), cos(E(x), T(prompt)))``, float64 ``[B]`` each, in [-1, 1]."""
        from flowrl_rewards._clip_common import check_batch

        check_batch(images, prompts, self.name)
        ci, ct = [], []
        for i in range(0, len(images), self.batch_size):
            img = self.embedder.image_embeds(images[i : i + self.batch_size])
            txt = self.embedder.text_embeds([strip_subject_token(p, self.subject_token)
                                             for p in prompts[i : i + self.batch_size]])
            ci.append((img @ self.ref_embeds.T).mean(1).double().cpu().numpy())
            ct.append((img * txt).sum(-1).double().cpu().numpy())
        empty = np.zeros(0, np.float64)
        return (np.concatenate(ci) if ci else empty), (np.concatenate(ct) if ct else empty)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None
                 ) -> dict[str, np.ndarray]:
        cos_img, cos_txt = self.cosines(images, prompts)
        s_img, s_txt = map_similarity(cos_img, self.mapping), map_similarity(cos_txt, self.mapping)
        r = lambda_harmonic(s_img, s_txt, self.lam) if len(images) else np.zeros(0)
        return {"reward": np.asarray(r, np.float32).reshape(-1), "s_img": np.asarray(s_img, np.float32).reshape(-1),
                "s_txt": np.asarray(s_txt, np.float32).reshape(-1)}


# -- preference labels ----------------------------------------------------------------------------------------------
def draw_preference_labels(r_ref, r_gen, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley–Terry preference labels of (reference, generated) pairs (RPO, arXiv 2407.12164).

    Pair ``i`` prefers the reference with probability ``p_i = σ(R_ref,i - R_gen,i)``; the label is the Bernoulli draw
    ``y_i = [u_i < p_i]`` with ``u_i = torch.rand(1)`` from ``torch.Generator().manual_seed(seeds[i])``, so a pair's
    label depends only on its seed (not on how pairs are batched or split across ranks).

    Args:
        r_ref, r_gen: ``[N]`` rewards (array-likes or tensors; any real values).
        seeds: ``N`` integer seeds, one per pair.

    Returns:
        ``(labels, probs)``: ``[N]`` bool (True = the reference is preferred) and ``[N]`` float32 ``p_i``.

    Raises:
        ValueError: lengths differ or a reward is not finite.
    """
    a = torch.as_tensor(np.asarray(r_ref, dtype=np.float64)).reshape(-1)
    b = torch.as_tensor(np.asarray(r_gen, dtype=np.float64)).reshape(-1)
    if a.shape != b.shape or len(seeds) != a.shape[0]:
        raise ValueError(f"r_ref {tuple(a.shape)}, r_gen {tuple(b.shape)} and {len(seeds)} seeds must have one length")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("preference rewards must be finite")
    probs = torch.sigmoid(a - b)
    u = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(int(s)))) for s in seeds],
                     dtype=torch.float64)
    return u < probs, probs.float()


# -- early stopping -------------------------------------------------------------------------------------------------
@dataclass
class EarlyStopping:
    """Early stopping on a validation score to maximise (RPO: the λ-Harmonic score).

    :meth:`update` records one evaluation; a score strictly above the best so far is an improvement (and resets the
    count of bad evaluations), anything else counts as one bad evaluation. :attr:`should_stop` is true once
    ``patience`` evaluations in a row did not improve.

    Raises (construction):
        ValueError: ``patience < 1``.
    """

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad: int = 0
    evals: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"patience must be an integer ≥ 1, got {self.patience!r}")

    def update(self, score: float, epoch: int) -> bool:
        """Record ``score`` of ``epoch``; returns whether it improved on the best (then it becomes the best).

        Raises:
            ValueError: a non-finite score.
        """
        if not math.isfinite(score):
            raise ValueError(f"validation score must be finite, got {score}")
        improved = score > self.best
        if improved:
            self.best, self.best_epoch, self.bad = float(score), int(epoch), 0
        else:
            self.bad += 1
        self.evals.append({"epoch": int(epoch), "score": float(score), "improved": bool(improved)})
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad, "evals": list(self.evals)}

    def load_state_dict(self, state: dict, before_epoch: int | None = None) -> None:
        """Restore a :meth:`state_dict`; with ``before_epoch`` only the evaluations of earlier epochs are kept and
        the best / bad count are recomputed from them (a resumed run re-does the later epochs)."""
        evals = [e for e in state.get("evals", []) if before_epoch is None or e["epoch"] < before_epoch]
        self.best, self.best_epoch, self.bad, self.evals = -math.inf, -1, 0, []
        for e in evals:
            self.update(e["score"], e["epoch"])


# -- configuration --------------------------------------------------------------------------------------------------
def read_subject_prompts(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The ``train`` and ``val`` records of an RPO prompt file: GenEval metadata JSON lines
    (:func:`flowrl.shapes.prompts.read_jsonl`: ``prompt``, ``tag``, ``include``) with a ``split`` key (``train`` —
    the default when absent — or ``val``).

    Raises:
        FileNotFoundError: no such file. ValueError: a malformed record or an unknown split (naming the line).
    """
    from flowrl.shapes.prompts import read_jsonl

    recs = read_jsonl(path)
    bad = [r["prompt"] for r in recs if r.get("split", "train") not in ("train", "val")]
    if bad:
        raise ValueError(f"{path}: 'split' must be 'train' or 'val' (records {bad[:3]})")
    return [r for r in recs if r.get("split", "train") == "train"], [r for r in recs if r.get("split") == "val"]


def config_errors(cfg) -> list[str]:
    """Refusals of ``algorithm.name=rpo`` (called by :func:`flowrl.config.validate`; files are checked, no model is
    loaded): reference images missing at ``algorithm.rpo_references``; ``rpo_lambda`` outside (0, 1) or
    ``rpo_label_lambda`` outside [0, 1]; the reward model missing (``reward`` other than ``lambda_harmonic``, no
    ``reward.args.model``, or reward arguments that contradict the ``algorithm.rpo_*`` ones); a prompt file without
    train / val prompts or without the subject token; ``rpo_patience`` / ``rpo_eval_every`` / ``rpo_val_images`` < 1;
    a non-positive ``dpo_beta``, a negative ``rpo_recon_weight``; and settings RPO has no use for (KL, dynamic
    sampling, GDPO, FSDP)."""
    a, r, t = cfg.algorithm, cfg.reward, cfg.trainer
    errs = []
    try:
        find_reference_images(a.rpo_references)
    except FileNotFoundError as e:
        errs.append(str(e))
    if not (isinstance(a.rpo_lambda, (int, float)) and 0 < a.rpo_lambda < 1):
        errs.append(f"algorithm.rpo_lambda={a.rpo_lambda}: λ of the λ-Harmonic reward 1/(λ/s_img + (1-λ)/s_txt) must lie "
                    "in (0, 1) (0.3 = the authors' default; 0 or 1 would ignore one of the two similarities)")
    if a.rpo_label_lambda is not None and not (isinstance(a.rpo_label_lambda, (int, float))
                                               and 0 <= a.rpo_label_lambda <= 1):
        errs.append(f"algorithm.rpo_label_lambda={a.rpo_label_lambda} must be in [0, 1] (or null = rpo_lambda)")
    args = dict(r.args or {})
    if r.name != "lambda_harmonic":
        errs.append(f"algorithm=rpo labels its pairs and early-stops with the λ-Harmonic reward model, but reward="
                    f"{r.name}: set reward=lambda_harmonic (reward.args.model = its CLIP, e.g. assets/shapes-clip)")
    else:
        if not args.get("model"):
            errs.append("reward=lambda_harmonic has no reward model: set reward.args.model to a CLIP folder (e.g. "
                        "assets/shapes-clip) or hub id")
        for key, want in (("references", a.rpo_references), ("lam", a.rpo_lambda), ("subject_token", a.rpo_token)):
            if key in args and args[key] != want:
                errs.append(f"reward.args.{key}={args[key]!r} contradicts algorithm.rpo_"
                            f"{'lambda' if key == 'lam' else 'references' if key == 'references' else 'token'}="
                            f"{want!r}; drop the reward argument (configs/reward/lambda_harmonic.yaml takes it from "
                            "algorithm.*) or set both equal")
    if not a.rpo_token or len(a.rpo_token.split()) != 1:
        errs.append(f"algorithm.rpo_token={a.rpo_token!r} must be one word (the subject's rare token, e.g. sks)")
    elif not has_token(a.rpo_instance_prompt, a.rpo_token):
        errs.append(f"algorithm.rpo_instance_prompt={a.rpo_instance_prompt!r} must contain the subject token "
                    f"{a.rpo_token!r} (e.g. 'a photo of a {a.rpo_token} star')")
    try:
        train, val = read_subject_prompts(a.rpo_prompts)
        if not train or not val:
            errs.append(f"algorithm.rpo_prompts={a.rpo_prompts}: needs 'train' prompts (generation) and 'val' prompts "
                        f"(early stopping); it has {len(train)} and {len(val)} (records carry \"split\": "
                        "\"train\" | \"val\")")
        elif a.rpo_token and not any(has_token(m["prompt"], a.rpo_token) for m in train):
            errs.append(f"algorithm.rpo_prompts={a.rpo_prompts}: no training prompt names the subject token "
                        f"{a.rpo_token!r}")
    except (FileNotFoundError, ValueError) as e:
        errs.append(f"algorithm.rpo_prompts: {e} (the example file is written by `python scripts/make_rpo_example.py`)")
    for key in ("rpo_patience", "rpo_eval_every", "rpo_val_images"):
        v = getattr(a, key)
        if not (isinstance(v, int) and v >= 1):
            what = {"rpo_patience": "evaluations without improvement before stopping",
                    "rpo_eval_every": "epochs between λ-Harmonic validations",
                    "rpo_val_images": "images per validation prompt"}[key]
            errs.append(f"algorithm.{key}={v!r} must be an integer ≥ 1 ({what})")
    if not (isinstance(a.dpo_beta, (int, float)) and math.isfinite(a.dpo_beta) and a.dpo_beta > 0):
        errs.append(f"algorithm.dpo_beta={a.dpo_beta}: the preference loss's β must be finite and > 0")
    if not (isinstance(a.rpo_recon_weight, (int, float)) and math.isfinite(a.rpo_recon_weight)
            and a.rpo_recon_weight >= 0):
        errs.append(f"algorithm.rpo_recon_weight={a.rpo_recon_weight} must be finite and ≥ 0 (0 = no reconstruction)")
    if a.kl_beta > 0:
        errs.append("algorithm.name=rpo has no separate KL term (the preference loss is anchored to the reference "
                    "policy through algorithm.dpo_beta): set algorithm.kl_beta=0")
    if a.dynamic_sampling:
        errs.append("algorithm.name=rpo pairs every generated image with a reference image (no groups): set "
                    "algorithm.dynamic_sampling=false")
    if r.aggregation == "gdpo":
        errs.append("reward.aggregation=gdpo normalises group advantages, which algorithm=rpo does not use: set "
                    "reward.aggregation=weighted_sum")
    if t.fsdp:
        errs.append("algorithm=rpo is not wired for FSDP (its validation splits images unevenly across ranks): train "
                    "a LoRA with DDP or drop trainer.fsdp")
    return errs


# -- the update -----------------------------------------------------------------------------------------------------
class RPOUpdater:
    """The ``algorithm=rpo`` epoch of a :class:`flowrl.trainer.Trainer` (module docstring for the algorithm).

    At construction the reference images are loaded at ``model.resolution`` (centre crop, bicubic resize:
    :func:`flowrl.trainer.load_image`) and encoded once with the adapter's VAE (``encode_images``, posterior mean);
    the instance prompt is encoded once.

    Raises (at construction):
        flowrl.config.ConfigError: the loaded reward is not :class:`LambdaHarmonic` (or uses other references, λ or
            token than ``algorithm.rpo_*``), or the adapter cannot encode images.
        FileNotFoundError / ValueError: missing references or a malformed prompt file.
    """

    def __init__(self, trainer):
        from flowrl.evaluation import to_uint8
        from flowrl.trainer import load_image

        self.tr = trainer
        cfg, a = trainer.cfg, trainer.cfg.algorithm
        fn = trainer.reward_fn
        if not isinstance(fn, LambdaHarmonic):
            raise ConfigError(f"algorithm=rpo needs reward=lambda_harmonic (the λ-Harmonic reward model); the loaded "
                              f"reward is {type(fn).__name__}")
        paths = find_reference_images(a.rpo_references)
        if [p.resolve() for p in fn.reference_paths] != [p.resolve() for p in paths] or \
                abs(fn.lam - a.rpo_lambda) > 1e-12 or fn.subject_token != a.rpo_token:
            raise ConfigError("reward=lambda_harmonic must score with algorithm.rpo_references / rpo_lambda / rpo_token "
                              f"(reward has {len(fn.reference_paths)} references, λ={fn.lam}, token "
                              f"{fn.subject_token!r}; algorithm has {len(paths)}, λ={a.rpo_lambda}, {a.rpo_token!r})")
        if not callable(getattr(trainer.adapter, "encode_images", None)):
            raise ConfigError(f"algorithm=rpo encodes the reference images with the model's VAE, which the "
                              f"{type(trainer.adapter).__name__} adapter cannot do (no encode_images); use "
                              "model.family=sd3")
        self.train_md, self.val_md = read_subject_prompts(a.rpo_prompts)
        self.reference_paths = paths
        res, mb = cfg.model.resolution, max(1, cfg.trainer.micro_batch)
        imgs = torch.stack([load_image(p, res) for p in paths])  # [K, 3, H, W] in [0, 1]
        self.ref_u8 = to_uint8(imgs)  # [K, H, W, 3]: what the reward sees (the same pixels the VAE encodes)
        self.ref_latents = torch.cat([trainer.adapter.encode_images(imgs[i : i + mb]).cpu()
                                      for i in range(0, len(imgs), mb)])  # [K, C, h, w]
        self.instance_cond = trainer.adapter.encode([a.rpo_instance_prompt])
        self.label_lambda = float(a.rpo_label_lambda if a.rpo_label_lambda is not None else a.rpo_lambda)
        self.stopper = EarlyStopping(int(a.rpo_patience))
        self.stop = False  # set when early stopping triggers; Trainer.run ends the epoch loop
        self._started = False
        self._base: dict | None = None  # the base model's validation scores
        self._details: list[dict] = []  # every validation's scores, written to output_dir/rpo_state.json

    # -- one epoch ----------------------------------------------------------------------------------------------
    def pairs(self, eb, cols: dict[str, np.ndarray], epoch: int) -> dict[str, torch.Tensor]:
        """Reference index, λ-Harmonic rewards (label λ) and Bradley–Terry labels of this rank's pairs.

        Args:
            eb: this rank's :class:`~flowrl.trainer.EpochBatch` (``n`` samples). cols: the rollout's reward columns
                (``s_img``, ``s_txt`` ``[n]``). epoch: seeds the labels.

        Returns:
            ``ref_index`` ``[n]`` long (``sample_id mod K``), ``r_ref`` / ``r_gen`` ``[n]`` float64, ``labels`` ``[n]``
            bool (True = reference preferred), ``probs`` ``[n]`` σ(R_ref - R_gen), and the reference's ``s_img`` /
            ``s_txt`` ``[n]``.
        """
        from flowrl.rewards import check_reward_output
        from flowrl.trainer import sample_seed

        cfg = self.tr.cfg
        k = torch.tensor([int(s) % len(self.reference_paths) for s in eb.sample_ids], dtype=torch.long)
        ref_cols = check_reward_output(self.tr.reward_fn(self.ref_u8[k.numpy()], eb.prompts, eb.metadata),
                                       len(eb.prompts), cfg.reward.name)
        r_ref = lambda_harmonic(ref_cols["s_img"], ref_cols["s_txt"], self.label_lambda)
        r_gen = lambda_harmonic(cols["s_img"], cols["s_txt"], self.label_lambda)
        labels, probs = draw_preference_labels(
            r_ref, r_gen, [sample_seed(cfg.trainer.seed, epoch, RPO_LABEL_OFFSET + int(s)) for s in eb.sample_ids])
        return {"ref_index": k, "r_ref": torch.as_tensor(np.atleast_1d(r_ref)),
                "r_gen": torch.as_tensor(np.atleast_1d(r_gen)), "labels": labels, "probs": probs,
                "ref_s_img": torch.as_tensor(ref_cols["s_img"]), "ref_s_txt": torch.as_tensor(ref_cols["s_txt"])}

    def loss_pass(self, x0_gen: torch.Tensor, prompts: list[str], ref_index: torch.Tensor, labels: torch.Tensor,
                  sample_ids: list[int], epoch: int) -> dict[str, float]:
        """The RPO gradient steps over this rank's pairs (module docstring, step 4).

        Args:
            x0_gen: ``[n, C, h, w]`` clean latents of the generated images. prompts: their ``n`` prompts.
            ref_index: ``[n]`` reference image of each pair. labels: ``[n]`` bool, True = the reference is the
                winner. sample_ids: ``n`` global sample indices (seed each pair's σ and ε). epoch: seeds the draws.

        Returns:
            Means over all pairs and draws of all ranks: ``rpo_loss`` (``ℓ_pref + w·recon``), ``rpo_pref_loss``,
            ``rpo_recon_loss``, ``rpo_implicit_acc`` (share of pairs whose DPO margin favours the labelled winner),
            ``rpo_reward_margin`` (mean DPO margin ``z``), ``rpo_err_gen`` (policy velocity error on the generated
            images; the one on the references is ``rpo_recon_loss``);
            ``rpo_first_loss``: this rank's first micro-batch, before any optimizer step of this update. Empty when no
            rank has a pair.
        """
        from flowrl.core.dpo import diffusion_dpo_loss, dpo_noisy_pair
        from flowrl.trainer import pair_draws

        tr, cfg, a = self.tr, self.tr.cfg, self.tr.cfg.algorithm
        adapter, dev, world = tr.adapter, tr.acc.device, tr.acc.num_processes
        n, k = x0_gen.shape[0], a.inner_epochs
        shape = tuple(x0_gen.shape[1:])
        pmb = max(1, cfg.trainer.micro_batch // 2)  # pairs per forward: micro_batch images
        sig_all, eps_all = pair_draws(cfg.trainer.seed, epoch, RPO_SEED_OFFSET, sample_ids, k, shape)
        cache = tr.encode_unique(prompts)
        names = ("rpo_loss", "rpo_pref_loss", "rpo_recon_loss", "rpo_implicit_acc", "rpo_reward_margin",
                 "rpo_err_gen")
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # the last entry counts pair draws
        first = None
        w = float(a.rpo_recon_weight)
        for d in range(k):
            for part in np.array_split(np.arange(n), cfg.trainer.optimizer_steps_per_epoch):
                count = tr._gather(torch.tensor([len(part)])).sum().item()
                if count == 0:  # identical decision on every rank (the count is global)
                    continue
                norm = count / world
                for j in range(0, len(part), pmb):
                    ids = torch.as_tensor(part[j : j + pmb], dtype=torch.long)
                    b = len(ids)
                    x0_r = self.ref_latents[ref_index[ids]].to(dev)
                    x_r, x_g, tgt_r, tgt_g = dpo_noisy_pair(x0_r, x0_gen[ids].to(dev), sig_all[ids, d].to(dev),
                                                            eps_all[ids, d].to(dev))
                    c_g = type(self.instance_cond).cat([cache[prompts[i]] for i in ids.tolist()])
                    c2 = type(c_g).cat([type(c_g).cat([self.instance_cond] * b), c_g])
                    x2, s2 = torch.cat([x_r, x_g]), torch.cat([sig_all[ids, d], sig_all[ids, d]])
                    v = adapter.velocity(x2, s2, c2, 1.0)
                    with torch.no_grad(), adapter.reference():
                        v_ref = adapter.velocity(x2, s2, c2, 1.0)
                    y = labels[ids].to(dev).view(-1, *([1] * (v.ndim - 1)))  # winner = reference where y

                    def order(ref_side, gen_side):
                        return torch.where(y, ref_side, gen_side), torch.where(y, gen_side, ref_side)

                    (pw, pl), (rw, rl), (tw, tl) = order(v[:b], v[b:]), order(v_ref[:b], v_ref[b:]), order(tgt_r, tgt_g)
                    out = diffusion_dpo_loss(pw, pl, rw, rl, tw, tl, a.dpo_beta, normaliser=norm)
                    recon = (v[:b] - tgt_r).pow(2).flatten(1).mean(1)  # [b] flow-matching error on the references
                    self.tr._backward(out.loss + w * recon.sum() / norm)
                    with torch.no_grad():
                        per = out.per_pair_loss + w * recon
                        if first is None:
                            first = per.mean().item()
                        err_gen = (v[b:] - tgt_g).pow(2).flatten(1).mean(1)
                        vals = (per, out.per_pair_loss, recon, (out.logits > 0).float(), out.logits, err_gen)
                        sums[:-1] += torch.stack([v_.detach().double().sum().cpu() for v_ in vals])
                        sums[-1] += b
                tr._optimizer_step()
        tot = tr._gather(sums.float()[None]).reshape(-1, len(names) + 1).double().sum(0)
        if tot[-1] == 0:
            return {}
        res = {name: float(tot[q] / tot[-1]) for q, name in enumerate(names)}
        if first is not None:
            res["rpo_first_loss"] = first
        return res

    def update(self, epoch: int) -> tuple[dict[str, float], np.ndarray]:
        """One RPO epoch: generate, score, label, ``trainer.optimizer_steps_per_epoch`` optimizer steps per inner
        epoch; then, every ``algorithm.rpo_eval_every`` epochs, the λ-Harmonic validation and early stopping
        (:meth:`validate_and_stop`).

        Returns:
            ``(stats, images)``: ``reward/mean`` / ``reward/std`` (λ-Harmonic score, ``λ = rpo_lambda``, of the
            generated images, all ranks), ``reward/s_img`` / ``reward/s_txt``; ``train/rpo_*`` (:meth:`loss_pass`, and
            ``train/rpo_ref_preferred`` = share of labels preferring the reference, ``train/rpo_pref_prob`` = mean
            σ(R_ref - R_gen), ``train/rpo_r_ref`` / ``train/rpo_r_gen`` = mean label-λ rewards); ``rpo/*`` when
            validated; and this rank's generated uint8 images ``[n, H, W, 3]``.
        """
        from flowrl.trainer import make_epoch

        tr, cfg = self.tr, self.tr.cfg
        if not self._started:
            self._started = True
            self._restore(epoch)
        eb = make_epoch(cfg, self.train_md, epoch, tr.acc.process_index, tr.acc.num_processes)
        traj, _cond, cols, images = tr.rollout(eb, epoch)
        p = self.pairs(eb, cols, epoch)
        stats = {f"train/{k_}": v for k_, v in self.loss_pass(traj.final.detach().cpu(), eb.prompts, p["ref_index"],
                                                               p["labels"], eb.sample_ids, epoch).items()}
        g = {k_: tr._gather(torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1)) for k_, v in
             (("reward", cols["reward"]), ("s_img", cols["s_img"]), ("s_txt", cols["s_txt"]),
              ("labels", p["labels"].float()), ("probs", p["probs"]), ("r_ref", p["r_ref"]), ("r_gen", p["r_gen"]))}
        r = g["reward"]
        stats.update({"reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
                      "reward/s_img": float(g["s_img"].mean()), "reward/s_txt": float(g["s_txt"].mean()),
                      "train/rpo_ref_preferred": float(g["labels"].mean()),
                      "train/rpo_pref_prob": float(g["probs"].mean()),
                      "train/rpo_r_ref": float(g["r_ref"].mean()), "train/rpo_r_gen": float(g["r_gen"].mean())})
        if (epoch + 1) % cfg.algorithm.rpo_eval_every == 0:
            stats.update(self.validate_and_stop(epoch))
        return stats, images

    # -- validation and early stopping --------------------------------------------------------------------------
    @torch.no_grad()
    def validation_scores(self, base: bool = False, label: str | None = None) -> dict[str, float]:
        """Mean λ-Harmonic score (``λ = rpo_lambda``), ``s_img`` and ``s_txt`` over ``rpo_val_images`` ODE images per
        ``val`` prompt (``sampler.eval_steps`` steps, CFG ``sampler.eval_guidance_scale``, image ``k`` of prompt ``i``
        from seed ``RPO_VAL_SEED + trainer.seed + i·V + k``): the EMA weights when kept, the base model with
        ``base``. The images are split across ranks and the sums gathered, so every rank gets the same numbers
        (collective). With ``label`` the main process saves a grid of the first image per prompt to
        ``output_dir/rpo/<label>.png``."""
        from contextlib import nullcontext

        from flowrl.evaluation import generate, save_grid
        from flowrl.rewards import check_reward_output

        tr, cfg = self.tr, self.tr.cfg
        t, s, a = cfg.trainer, cfg.sampler, cfg.algorithm
        per = int(a.rpo_val_images)
        jobs = [(i, k) for i in range(len(self.val_md)) for k in range(per)]
        mine = jobs[tr.acc.process_index :: tr.acc.num_processes]
        sums = torch.zeros(4, dtype=torch.float64)
        firsts: dict[int, np.ndarray] = {}
        ctx = tr.adapter.reference() if base else (tr.ema.swapped() if tr.ema is not None else nullcontext())
        with ctx:
            for j in range(0, len(mine), max(1, t.eval_batch)):
                chunk = mine[j : j + max(1, t.eval_batch)]
                mds = [self.val_md[i] for i, _ in chunk]
                prompts = [m["prompt"] for m in mds]
                imgs = generate(tr.adapter, prompts, [RPO_VAL_SEED + t.seed + i * per + k for i, k in chunk],
                                s.eval_steps, s.eval_guidance_scale, cfg.model.resolution)
                c = check_reward_output(tr.reward_fn(imgs, prompts, mds), len(imgs), cfg.reward.name)
                sums += torch.tensor([c["reward"].sum(), c["s_img"].sum(), c["s_txt"].sum(), len(imgs)],
                                     dtype=torch.float64)
                firsts.update({i: im for (i, k), im in zip(chunk, imgs) if k == 0})
        tot = tr._gather(sums.float()[None]).reshape(-1, 4).double().sum(0)
        if label and tr.acc.is_main_process and firsts:
            save_grid(np.stack([firsts[i] for i in sorted(firsts)]), tr.out / "rpo" / f"{label}.png")
        n = max(float(tot[3]), 1.0)
        return {"harmonic": float(tot[0] / n), "s_img": float(tot[1] / n), "s_txt": float(tot[2] / n)}

    def validate_and_stop(self, epoch: int) -> dict[str, float]:
        """Validate after ``epoch``'s update, update the early-stopping state, save ``checkpoints/best`` on an
        improvement and set :attr:`stop` after ``rpo_patience`` evaluations without one. At the first evaluation of
        a fresh run the base model is validated too (``rpo/harmonic_base``). The state (every evaluation's score) is
        written to ``output_dir/rpo_state.json`` and restored on resume.

        Returns:
            ``rpo/harmonic``, ``rpo/s_img``, ``rpo/s_txt``, ``rpo/best_harmonic``, ``rpo/best_epoch``, ``rpo/bad_evals``
            (and ``rpo/harmonic_base``).
        """
        tr = self.tr
        out: dict[str, float] = {}
        if self._base is None:
            self._base = self.validation_scores(base=True, label="base")
            out.update({"rpo/harmonic_base": self._base["harmonic"], "rpo/s_img_base": self._base["s_img"],
                        "rpo/s_txt_base": self._base["s_txt"]})
        sc = self.validation_scores(label=f"val_epoch_{epoch:04d}")
        improved = self.stopper.update(sc["harmonic"], epoch)
        if improved:
            tr.save("best", epoch, tr.history)
        self.stop = self.stopper.should_stop
        self._details.append({"epoch": epoch, **sc})
        if tr.acc.is_main_process:
            state = {**self.stopper.state_dict(), "evals_detail": self._details, "base": self._base}
            tr.out.mkdir(parents=True, exist_ok=True)
            (tr.out / "rpo_state.json").write_text(json.dumps(state, indent=1))
            if self.stop:
                print(f"RPO early stopping after epoch {epoch}: λ-Harmonic {sc['harmonic']:.4f}, best "
                      f"{self.stopper.best:.4f} at epoch {self.stopper.best_epoch} (checkpoints/best); "
                      f"{self.stopper.bad} evaluations without improvement", flush=True)
        out.update({"rpo/harmonic": sc["harmonic"], "rpo/s_img": sc["s_img"], "rpo/s_txt": sc["s_txt"],
                    "rpo/best_harmonic": self.stopper.best, "rpo/best_epoch": float(self.stopper.best_epoch),
                    "rpo/bad_evals": float(self.stopper.bad)})
        return out

    def _restore(self, epoch: int) -> None:
        """On a resumed run (first epoch > 0), reload the early-stopping state of the epochs before ``epoch``."""
        f = self.tr.out / "rpo_state.json"
        if epoch == 0 or not f.is_file():
            return
        state = json.loads(f.read_text())
        self.stopper.load_state_dict(state, before_epoch=epoch)
        self._details = [e for e in state.get("evals_detail", []) if e["epoch"] < epoch]
        self._base = state.get("base")
