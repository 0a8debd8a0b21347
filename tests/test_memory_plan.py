"""scripts/memory_plan.py and configs/accelerate (scale-out): meta-device parameter counts equal real ones, the
activation formula matches what autograd saves on tiny transformers, the plan's verdicts for the two anchor cases,
and every accelerate launch file passes accelerate's own loader and launch-time checks. Offline, CPU, ~30 s."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_FILES = {"ddp_8gpu.yaml", "fsdp_8gpu.yaml", "fsdp_8gpu_flux.yaml", "deepspeed_zero2_8gpu.yaml",
                    "multinode_2x8.yaml", "cpu_2proc.yaml"}
TOLERANCE = 0.35  # |formula / measured - 1| allowed for the activation estimate


@pytest.fixture(scope="module")
def mp():
    spec = importlib.util.spec_from_file_location("flowrl_memory_plan", ROOT / "scripts" / "memory_plan.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def counts(mp):
    return {k: mp.plan_counts(k) for k in ("sd35m", "flux")}


def _tiny_configs(mp):
    return [
        ("sd3", mp.tiny_sd3_config()),
        ("flux", mp.tiny_flux_config()),
        ("vae", dict(mp.VAE_16CH, block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=32)),
        ("clip_proj", dict(mp._CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           hidden_act="gelu", projection_dim=32)),
        ("clip", dict(mp._CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      hidden_act="quick_gelu", projection_dim=32)),
        ("t5", dict(mp.T5_XXL, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
    ]


def test_meta_device_counts_equal_real_instantiation(mp):
    for kind, cfg in _tiny_configs(mp):
        meta, real = mp.build_module(kind, cfg), mp.build_module(kind, cfg, meta=False)
        assert all(p.is_meta for p in meta.parameters()), kind
        assert not any(p.is_meta for p in real.parameters()), kind
        assert mp.count_params(meta) == mp.count_params(real) > 0, kind
        assert mp.count_persistent_buffers(meta) == mp.count_persistent_buffers(real), kind
    # the LoRA: peft on the meta device = peft on a real model = Σ rank·(in + out) over the targeted Linears
    meta, real = mp.build_module("sd3", mp.tiny_sd3_config()), mp.build_module("sd3", mp.tiny_sd3_config(), meta=False)
    analytic = mp.lora_param_count_analytic(meta, rank=4)
    assert mp.lora_param_count(meta, rank=4) == mp.lora_param_count(real, rank=4) == analytic > 0


def test_published_model_counts(counts):
    sd, fx = counts["sd35m"][0], counts["flux"][0]
    assert sd.transformer == 2_243_171_520 and sd.transformer_buffers == 384 * 384 * 1536
    assert fx.transformer == 11_901_408_320 and fx.transformer_buffers == 0
    # rank 32 on every attention projection: SD3.5-M 24 blocks (13 with attn2, the last without to_add_out),
    # FLUX 19 double-stream blocks × 8 projections + 38 single-stream × 3, all 1536- resp. 3072-wide
    assert sd.lora == 32 * (1536 + 1536) * (24 * 8 - 1 + 13 * 4) == 23_887_872
    assert fx.lora == 32 * (3072 + 3072) * (19 * 8 + 38 * 3) == 52_297_728
    assert sd.text_encoders["T5-XXL encoder (T5EncoderModel)"] == fx.text_encoders["T5-XXL encoder (T5EncoderModel)"]
    assert sum(sd.text_encoders.values()) == 123_650_304 + 694_659_840 + 4_762_310_656
    assert sd.vae == fx.vae == 83_819_683


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_activation_formula_matches_saved_tensors(mp, full):
    m = mp.measure_tiny("sd3", full=full, checkpointing=False, latent=16, text=20)
    assert m.hooks_saved > 0
    assert abs(m.formula.saved / m.hooks_saved - 1) <= TOLERANCE, (m.formula.saved, m.hooks_saved)
    # the storages alive after the forward are the ones the hooks saw (same quantity, independent method)
    assert abs(m.retained / m.hooks_saved - 1) <= 0.05
    assert abs(m.formula.peak / m.peak - 1) <= TOLERANCE, (m.formula.peak, m.peak)


def test_activation_formula_on_another_shape_and_with_checkpointing(mp):
    cfg = mp.tiny_sd3_config(num_layers=3, dual_attention_layers=(0, 1), attention_head_dim=32, num_attention_heads=2,
                             caption_projection_dim=64)
    m = mp.measure_tiny("sd3", latent=8, text=40, batch=1, config=cfg)
    assert abs(m.formula.saved / m.hooks_saved - 1) <= TOLERANCE, (m.formula.saved, m.hooks_saved)
    ck = mp.measure_tiny("sd3", checkpointing=True, latent=16, text=20)
    assert abs(ck.formula.saved / ck.retained - 1) <= TOLERANCE, (ck.formula.saved, ck.retained)
    assert abs(ck.formula.peak / ck.peak - 1) <= TOLERANCE, (ck.formula.peak, ck.peak)
    assert ck.retained < m.hooks_saved  # checkpointing keeps only the block inputs


def test_plan_verdicts(mp, counts):
    sd_rows = {(r.hardware, r.method): r for r in mp.plan(mp.SD35M_512, counts["sd35m"][1])}
    lora = sd_rows[("1×24 GB", "LoRA r32")]
    assert lora.fits and lora.recommended[0] is True  # fits, with gradient checkpointing
    assert lora.options[(True, True)] >= 1 and lora.options[(True, True)] > lora.options[(False, True)]
    assert lora.breakdown.peak <= 24 * mp.GiB
    fx_rows = {(r.hardware, r.method, r.sharding): r for r in mp.plan(mp.FLUX_1024, counts["flux"][1])}
    full = fx_rows[("1×24 GB", "full FT", "none")]
    assert not full.fits and all(b == 0 for b in full.options.values())
    assert not fx_rows[("1×24 GB", "LoRA r32", "none")].fits  # the bf16 transformer alone is 22 GiB
    assert fx_rows[("8×80 GB", "full FT", "fsdp")].fits


def test_memory_model_is_monotone(mp, counts):
    c = counts["sd35m"][1]
    kw = dict(gpus=1, full=False, sharding="none", te_offload=False)
    peaks = [mp.memory(mp.SD35M_512, c, checkpointing=True, micro_batch=b, **kw).peak for b in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    no_ckpt = mp.memory(mp.SD35M_512, c, checkpointing=False, micro_batch=4, **kw)
    assert no_ckpt.train > mp.memory(mp.SD35M_512, c, checkpointing=True, micro_batch=4, **kw).train
    off = mp.memory(mp.SD35M_512, c, checkpointing=True, micro_batch=4, **{**kw, "te_offload": True})
    assert off.parts["text encoders"] == 0 and off.peak < peaks[2]


def test_accelerate_configs_pass_accelerates_checks(mp):
    files = {p.name: p for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert set(files) == ACCELERATE_FILES
    s = {name: mp.check_accelerate_config(path) for name, path in files.items()}

    ddp = s["ddp_8gpu.yaml"]
    assert (ddp["distributed_type"], ddp["num_processes"], ddp["mixed_precision"]) == ("MULTI_GPU", 8, "bf16")
    assert ddp["torchrun"]["nproc_per_node"] == "8"

    for name, classes, model in (("fsdp_8gpu.yaml", ["JointTransformerBlock"], "SD3Transformer2DModel"),
                                 ("fsdp_8gpu_flux.yaml", ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
                                  "FluxTransformer2DModel")):
        f = s[name]
        assert f["distributed_type"] == "FSDP" and f["mixed_precision"] == "bf16"
        p = f["fsdp_plugin"]
        assert p["sharding_strategy"].endswith("FULL_SHARD") and p["state_dict_type"].endswith("SHARDED_STATE_DICT")
        assert p["use_orig_params"] is True and p["cpu_offload"] is False
        assert p["wrap_classes"] == classes and p["wrapped_on"] == model

    ds = s["deepspeed_zero2_8gpu.yaml"]
    from flowrl.config import TrainerConfig

    assert ds["deepspeed_config"]["zero_stage"] == 2 and ds["deepspeed_config"]["bf16"] is True
    assert ds["deepspeed_config"]["gradient_clipping"] == TrainerConfig().grad_clip == 1.0
    assert ds["deepspeed_config"]["offload_optimizer"] == ds["deepspeed_config"]["offload_param"] == "none"

    mn = s["multinode_2x8.yaml"]
    assert (mn["num_processes"], mn["num_machines"], mn["machine_rank"]) == (16, 2, 0)
    assert mn["torchrun"]["nproc_per_node"] == "8" and mn["torchrun"]["nnodes"] == "2"

    cpu = s["cpu_2proc.yaml"]
    assert cpu["use_cpu"] is True and cpu["num_processes"] == 2 and cpu["mixed_precision"] == "no"
    assert cpu["torchrun"]["nproc_per_node"] == "2"


def test_accelerate_check_refuses_what_launch_would_accept_silently(mp, tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "configs" / "accelerate" / "fsdp_8gpu.yaml").read_text()
    bad.write_text(text.replace("fsdp_config:\n", "fsdp_config:\n  fsdp_shard_everything: true\n"))
    with pytest.raises(ValueError, match="fsdp_shard_everything"):
        mp.check_accelerate_config(bad)
    # one class list cannot serve both models: accelerate refuses a wrap class the model does not contain
    with pytest.raises(ValueError, match="FluxTransformerBlock"):
        mp.check_accelerate_config(ROOT / "configs" / "accelerate" / "fsdp_8gpu_flux.yaml",
                                   model=mp.build_module("sd3", mp.tiny_sd3_config()))
