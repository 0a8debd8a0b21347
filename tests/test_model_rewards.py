"""Model-backed reward plugins (CLIPScore, PickScore, LAION aesthetic, HPSv2, ImageReward).

The CLIP-based rewards load tiny random ``CLIPModel``s saved to a temporary folder through their real
``from_pretrained`` path (offline); expected values come from an independent computation with the model's own
weights, or from models/heads built so that the answer is known in closed form. HPSv2 and ImageReward cannot run
here (their stacks need torchvision / an older transformers): only their loud ImportError is tested.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "shapes-sd3" / "tokenizer"  # CLIP's real BPE tokenizer (model_max_length 16)
PROMPT = "a photo of a red circle"
LOGIT_SCALE = 100.0  # exp(logit_scale) of the tiny models, as in OpenAI CLIP and PickScore
PROJ = 24  # projection_dim (768 for CLIP ViT-L/14)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)


def _build(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=PROJ, logit_scale_init_value=float(math.log(LOGIT_SCALE)))
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER))
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _hand(path: Path, images: np.ndarray, prompts: list[str]):
    """Unit image/text embeddings (float64 numpy) computed from the saved weights without the plugins' code: towers'
    pooled outputs times the projection matrices, each prompt tokenised alone (no padding). Also returns
    exp(logit_scale) and the vision tower's pooled features."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    img = pooled = txt = None
    with torch.no_grad():
        if len(images):
            pix = proc.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
            pooled = model.vision_model(pixel_values=pix).pooler_output.double().numpy()
            img = pooled @ model.visual_projection.weight.double().numpy().T
            img = img / np.linalg.norm(img, axis=1, keepdims=True)
        if prompts:
            txt = []
            for p in prompts:
                ids = proc.tokenizer(p, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
                t = model.text_model(input_ids=ids).pooler_output.double().numpy()
                txt.append((t @ model.text_projection.weight.double().numpy().T)[0])
            txt = np.stack(txt)
            txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, float(model.logit_scale.detach().exp()), pooled


def _aligned(base: Path, out: Path, images: np.ndarray, targets: np.ndarray) -> Path:
    """Copy of ``base`` whose visual projection maps image k exactly onto the unit vector ``targets[k]`` and keeps
    the random projection on the complement of the images' pooled features (so other images stay generic)."""
    from transformers import CLIPModel, CLIPProcessor

    _, _, _, pooled = _hand(base, images, [])
    x = pooled.T  # [D_vision, K]
    pinv = np.linalg.solve(x.T @ x, x.T)  # [K, D_vision]
    model = CLIPModel.from_pretrained(base)
    r = model.visual_projection.weight.double().detach().numpy()
    w = targets.T @ pinv + r @ (np.eye(len(x)) - x @ pinv)  # w @ x = targets.T
    with torch.no_grad():
        model.visual_projection.weight.copy_(torch.from_numpy(w).float())
    model.save_pretrained(out)
    CLIPProcessor.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_clip")
    base = _build(d / "base")
    yy, xx = np.mgrid[0:40, 0:48]
    imgs = np.stack([_images(1, seed=1)[0], np.full((40, 48, 3), (200, 30, 30), np.uint8),  # A noise, B flat,
                     np.stack([xx * 5, yy * 6, 255 - xx * 5], -1).astype(np.uint8)])  # C a colour gradient
    txt = _hand(base, imgs[:0], [PROMPT])[1][0]
    basis = np.eye(PROJ)
    return {
        "base": base,
        "images": imgs,
        "text_unit": txt,
        # image A ↦ the prompt's direction, B ↦ its opposite (C untouched)
        "text_aligned": _aligned(base, d / "text_aligned", imgs[:2], np.stack([txt, -txt])),
        # image A ↦ e0, B ↦ e1
        "basis_aligned": _aligned(base, d / "basis_aligned", imgs[:2], basis[:2]),
    }


def test_clip_and_pick_scores_match_independent_computation(models):
    from transformers import CLIPModel, CLIPProcessor

    from flowrl_rewards.clip_score import CLIPScore
    from flowrl_rewards.pickscore import PickScore

    base = models["base"]
    imgs = _images(4, seed=2)
    prompts = ["a red circle", "two blue squares", "a green triangle above a square", PROMPT]
    clip = CLIPScore(model=str(base), device="cpu")(imgs, prompts, None)
    pick = PickScore(model=str(base), processor=str(base), device="cpu")(imgs, prompts, None)
    img, txt, scale, _ = _hand(base, imgs, prompts)
    cos = (img * txt).sum(1)
    assert scale == pytest.approx(LOGIT_SCALE, rel=1e-5)
    np.testing.assert_allclose(clip["cosine"], cos, atol=2e-5)
    np.testing.assert_allclose(clip["reward"], scale * cos / 30, atol=1e-4)
    np.testing.assert_allclose(pick["reward"], scale * cos / 26, atol=1e-4)
    np.testing.assert_allclose(pick["cosine"], clip["cosine"], atol=1e-6)
    assert clip["reward"].dtype == np.float32 and clip["reward"].shape == (4,)
    # REFERENCE §7's literal definition: the diagonal of CLIP's own logits_per_image, over 30
    model, proc = CLIPModel.from_pretrained(base).eval(), CLIPProcessor.from_pretrained(base)
    inputs = proc(text=prompts, images=list(imgs), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal().numpy()
    np.testing.assert_allclose(clip["reward"], logits / 30, atol=1e-4)


def test_known_alignment_gives_the_scale_factor_and_ranks_the_matching_image_first(models):
    from flowrl_rewards.clip_score import CLIPScore
    from flowrl_rewards.pickscore import PickScore

    path, imgs = str(models["text_aligned"]), models["images"]
    prompts = [PROMPT] * 3
    clip = CLIPScore(model=path, device="cpu", batch_size=2)(imgs, prompts, None)
    pick = PickScore(model=path, processor=path, device="cpu")(imgs, prompts, None)
    np.testing.assert_allclose(clip["cosine"][:2], [1.0, -1.0], atol=1e-4)
    np.testing.assert_allclose(clip["reward"][:2], [LOGIT_SCALE / 30, -LOGIT_SCALE / 30], atol=1e-3)
    np.testing.assert_allclose(pick["reward"][:2], [LOGIT_SCALE / 26, -LOGIT_SCALE / 26], atol=1e-3)
    assert clip["reward"][0] > clip["reward"][2] > clip["reward"][1]
    assert pick["reward"][0] > pick["reward"][2] > pick["reward"][1]
    # bfloat16 towers: the logit scale is read before the cast (bf16 would round exp(4.6052) to 98.9)
    half = CLIPScore(model=path, device="cpu", dtype="bfloat16")
    assert half.embedder.logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-6)
    np.testing.assert_allclose(half(imgs, prompts, None)["reward"], clip["reward"], atol=0.1)


def test_batch_splitting_and_input_checks(models):
    from flowrl_rewards.clip_score import CLIPScore

    path = str(models["base"])
    imgs = _images(5, seed=3)
    long = "a photo of " + " and ".join(["a small red circle"] * 8)  # far beyond the 16-token limit
    prompts = ["a red circle", long, "", "two blue squares", "a red circle"]
    fn = CLIPScore(model=path, device="cpu")
    outs = []
    for b in (1, 2, 5):
        fn.batch_size = b
        outs.append(fn(imgs, prompts, None)["reward"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=1e-5)
    assert len(set(np.round(outs[0], 5))) == 5  # different pairs, different scores
    # prompts are truncated at the text tower's 16 positions: words past the limit change nothing
    more = fn(imgs[1:2], [long + " and a big blue square"], None)["reward"]
    np.testing.assert_allclose(more, outs[0][1:2], atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        fn(imgs.astype(np.float32), prompts, None)
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        fn(imgs, prompts[:4], None)
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScore(model=path, batch_size=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        CLIPScore(model=path, dtype="int8")
    assert fn(imgs[:0], [], None)["reward"].shape == (0,)


def _head(in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = (in_dim, 1024, 128, 64, 16, 1)
    sd = {}
    for k, idx in enumerate((0, 2, 4, 6, 7)):
        sd[f"layers.{idx}.weight"] = torch.randn(dims[k + 1], dims[k], generator=g) / math.sqrt(dims[k])
        sd[f"layers.{idx}.bias"] = torch.randn(dims[k + 1], generator=g) * 0.1
    return sd


def test_aesthetic_random_head_matches_hand_computation(models, tmp_path):
    from flowrl_rewards.aesthetic import AestheticReward

    base, imgs = models["base"], _images(4, seed=4)
    sd = _head(PROJ, seed=5)
    torch.save(sd, tmp_path / "head.pth")
    fn = AestheticReward(head=str(tmp_path / "head.pth"), model=str(base), device="cpu", batch_size=3)
    got = fn(imgs, ["ignored"] * 4, None)["reward"]
    e = _hand(base, imgs, [])[0]
    for idx in (0, 2, 4, 6, 7):  # no activations: an affine chain
        e = e @ sd[f"layers.{idx}.weight"].double().numpy().T + sd[f"layers.{idx}.bias"].double().numpy()
    np.testing.assert_allclose(got, e[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fn(imgs, None, None)["reward"], got)  # eval mode: dropout off, deterministic
    assert got.shape == (4,) and got.dtype == np.float32


def test_aesthetic_structured_head_gives_known_values(models, tmp_path):
    """With image A ↦ e0 and B ↦ e1 and a head reading w·e + 5, the scores are w0 + 5 and w1 + 5."""
    from safetensors.torch import save_file

    from flowrl_rewards.aesthetic import AestheticReward

    sd = {k: torch.zeros_like(v) for k, v in _head(PROJ, seed=0).items()}
    w = torch.randn(PROJ, generator=torch.Generator().manual_seed(6))
    w[0], w[1] = 2.0, -1.0
    sd["layers.0.weight"][0] = w
    for idx in (2, 4, 6, 7):
        sd[f"layers.{idx}.weight"][0, 0] = 1.0
    sd["layers.7.bias"][0] = 5.0
    save_file(sd, str(tmp_path / "head.safetensors"))
    fn = AestheticReward(head=str(tmp_path / "head.safetensors"), model=str(models["basis_aligned"]), device="cpu")
    got = fn(models["images"], None, None)["reward"]
    np.testing.assert_allclose(got[:2], [7.0, 4.0], atol=1e-4)


def test_aesthetic_head_errors(models, tmp_path):
    from flowrl_rewards.aesthetic import AestheticReward

    base = str(models["base"])
    with pytest.raises(ValueError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        AestheticReward(model=base)
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        AestheticReward(head=str(tmp_path / "missing.pth"), model=base)
    torch.save(_head(768, seed=0), tmp_path / "real_sized.pth")  # a ViT-L/14 head on a 24-d CLIP
    with pytest.raises(ValueError, match="24→1024→128→64→16→1"):
        AestheticReward(head=str(tmp_path / "real_sized.pth"), model=base)


def test_missing_model_offline_fails_clearly(tmp_path):
    from flowrl_rewards.clip_score import CLIPScore

    with pytest.raises(OSError):
        CLIPScore(model=str(tmp_path / "no_such_model"))


def test_missing_transformers_names_the_pip_line(monkeypatch):
    from flowrl_rewards.aesthetic import AestheticReward
    from flowrl_rewards.clip_score import CLIPScore
    from flowrl_rewards.pickscore import PickScore

    monkeypatch.setitem(sys.modules, "transformers", None)
    for make in (lambda: CLIPScore(), lambda: PickScore(), lambda: AestheticReward(head="x.pth")):
        with pytest.raises(ImportError, match='pip install "transformers>=4.51" torch'):
            make()


def test_hpsv2_without_open_clip_explains_the_reward_server_route(monkeypatch, tmp_path):
    from flowrl_rewards.hps import HPS_PIP, HPSv2Reward

    for mod in ("open_clip", "hpsv2", "hpsv2.src"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError) as err:
        HPSv2Reward(checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    msg = str(err.value)
    assert HPS_PIP == "pip install open_clip_torch torchvision" and HPS_PIP in msg
    for needle in ("python -m venv .venv-hps", "python -m flowrl.reward_server --reward hpsv2 --port 18087",
                   "reward=remote reward.args.url=http://127.0.0.1:18087", "xswu/HPSv2", "protobuf<4"):
        assert needle in msg, needle
    # a torchvision that breaks at import (CUDA wheel beside CPU torch) raises RuntimeError: still an ImportError
    fake = tmp_path / "site"
    (fake / "open_clip").mkdir(parents=True)
    (fake / "open_clip" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.delitem(sys.modules, "open_clip")
    monkeypatch.syspath_prepend(str(fake))
    with pytest.raises(ImportError, match="torchvision::nms") as err:
        HPSv2Reward()
    assert HPS_PIP in str(err.value)
    with pytest.raises(ValueError, match="unknown version"):
        HPSv2Reward(version="v3")


def test_imagereward_without_package_explains_the_reward_server_route(monkeypatch):
    from flowrl_rewards.image_reward import IMAGEREWARD_PIP, ImageRewardScore

    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(ImportError) as err:
        ImageRewardScore()
    msg = str(err.value)
    assert IMAGEREWARD_PIP.startswith("pip install image-reward==1.5 ") and IMAGEREWARD_PIP in msg
    for needle in ("python -m venv .venv-imagereward", "--reward imagereward --port 18088",
                   "reward=remote reward.args.url=http://127.0.0.1:18088"):
        assert needle in msg, needle


def test_each_plugin_imports_only_its_own_dependencies():
    """Importing a plugin module pulls in none of the heavy stacks; they are imported when a reward is built."""
    code = textwrap.dedent("""
        import sys
        import flowrl_rewards.clip_score, flowrl_rewards.pickscore, flowrl_rewards.aesthetic
        import flowrl_rewards.hps, flowrl_rewards.image_reward
        heavy = [m for m in ("torch", "transformers", "open_clip", "ImageReward", "hpsv2") if m in sys.modules]
        print(heavy)
        sys.exit(1 if heavy else 0)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
