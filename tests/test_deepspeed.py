"""DeepSpeed ZeRO-2 for full fine-tuning in the image trainer (``trainer.deepspeed_zero=2``, flowrl/deepspeed_zero.py).

Skipped when ``import deepspeed`` fails (DeepSpeed is an optional extra: ``pip install 'flowrl[deepspeed]'``).

(a) Start-up refusals: a LoRA, one process, an unwired stage, FSDP and ZeRO together.
(b) 2 CPU ranks under ZeRO-2 (``torchrun``, gloo, one thread each) make the same epoch as 1 process without it
    (the same driver and uneven rank split as tests/test_full_finetune.py's FSDP test).
(c) A ZeRO-2 checkpoint (full weights, EMA, each rank's optimizer partition) resumed on 2 ZeRO-2 ranks reproduces
    the uninterrupted run exactly; without its partitions, or on 1 process without DeepSpeed, AdamW restarts.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (optional: pip install deepspeed)")

from flowrl.config import ConfigError, validate  # noqa: E402

from test_full_finetune import DRIVER, REWARD, _cfg, _free_port, _run  # noqa: E402

# the FSDP driver records the whole gradients handed to AdamW; under ZeRO-2 they live in the ranks' partitions
# (p.grad is None at the ZeRO optimizer's step), so the ZeRO driver records the logged pre-clip norm instead
DS_DRIVER = DRIVER.replace('rec["grads"].append([full(p.grad.detach()).clone() for p in tr.params])',
                           'rec["grads"].append([full(p.grad.detach()).clone() for p in tr.params '
                           'if p.grad is not None])')
# ... and AdamW's step count at the end (the base optimizer under the ZeRO optimizer): restored on an exact resume
DS_DRIVER = DS_DRIVER.replace('"fsdp": tr.fsdp,', '"fsdp": tr.fsdp, "ds": tr.ds is not None, "adam_step": '
                              'float(next(iter((tr.opt.optimizer if tr.ds is not None else tr.opt)'
                              '.state.values()))["step"]),')
assert DS_DRIVER.count("p.grad is not None") == 1 and '"ds": tr.ds' in DS_DRIVER


def test_start_up_refusals(tiny_sd3_path, tmp_path):
    def errors(world, *overrides):
        with pytest.raises(ConfigError) as e:
            validate(_cfg(tiny_sd3_path, tmp_path, *overrides), world)
        return str(e.value)

    msg = errors(2, "model.lora_rank=8", "trainer.deepspeed_zero=2")
    assert "a LoRA (model.lora_rank=8) trains with DDP" in msg and "ddp_8gpu.yaml" in msg
    assert "at least 2 processes" in errors(1, "trainer.deepspeed_zero=2")
    assert "flowrl wires 0 (off) and 2 (ZeRO-2)" in errors(2, "trainer.deepspeed_zero=3")
    assert "pick one" in errors(2, "trainer.deepspeed_zero=2", "trainer.fsdp=true")
    validate(_cfg(tiny_sd3_path, tmp_path, "trainer.deepspeed_zero=2"), 2)  # full FT + ZeRO-2 on 2 ranks


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_two_zero2_ranks_make_the_same_epoch_as_one_process(tiny_sd3_path, tmp_path):
    from flowrl.models.sd3 import load_denoiser_state

    (tmp_path / "driver.py").write_text(DS_DRIVER)
    (tmp_path / "flat_reward.py").write_text(REWARD)
    t0 = time.time()
    _run([sys.executable, str(tmp_path / "driver.py"), tiny_sd3_path, str(tmp_path / "w1"), str(tmp_path / "w1.pt")])
    t1 = time.time()
    log = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(tmp_path / "driver.py"),
                tiny_sd3_path, str(tmp_path / "w2"), str(tmp_path / "w2.pt"), "trainer.deepspeed_zero=2"],
               timeout=400)
    t2 = time.time()
    r1, r2 = (torch.load(tmp_path / f"w{k}.pt", weights_only=False) for k in (1, 2))
    assert (r1["world"], r1["ds"], r2["world"], r2["ds"]) == (1, False, 2, True)
    assert r2["cls"] == "SD3Transformer2DModel"  # ZeRO-2 leaves the module itself alone
    assert "DeepSpeed ZeRO-2: optimizer state and gradients of SD3Transformer2DModel partitioned over 2 ranks" in log
    # the lock-step padding paths ran: uneven samples per rank (a dropped group) and per-group SDE windows
    assert r2["n_per_rank"] == [6, 2] and r1["n_per_rank"] == [8]
    h1, h2 = r1["history"][0], r2["history"][0]
    assert h1["reward/mean"] == h2["reward/mean"] and h1["train/groups"] == h2["train/groups"] == 2
    assert h1["train/first_ratio_max_dev"] == h2["train/first_ratio_max_dev"] == 0.0
    # the pre-clip global norm the engine computed over the partitions = the 1-process norm
    assert h2["train/grad_norm"] == pytest.approx(h1["train/grad_norm"], rel=1e-5)
    moved, dev = 0.0, {}
    for sub in ("transformer", "transformer_ema"):
        w1, w2 = (load_denoiser_state(tmp_path / w / "checkpoints" / "final" / sub) for w in ("w1", "w2"))
        assert w1.keys() == w2.keys()
        dev[sub] = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        if sub == "transformer":
            b = dict(zip(r1["names"], r1["before"]))
            moved = max((w1[k] - b[k]).abs().max().item() for k in b)
    print(f"ZeRO-2 vs 1 process: max |Δw| transformer {dev['transformer']:.2e}, EMA {dev['transformer_ema']:.2e}; "
          f"the step moved weights by {moved:.2e}; grad norm {h1['train/grad_norm']:.6g} vs "
          f"{h2['train/grad_norm']:.6g}; 1 process {t1 - t0:.0f} s, 2 ranks {t2 - t1:.0f} s")
    assert moved > 1e-4 and dev["transformer"] < 1e-5 and dev["transformer_ema"] < 1e-5
    assert r1["trained"]["reward"] == pytest.approx(r2["trained"]["reward"], abs=1e-4)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_zero2_checkpoint_resumes_exactly_with_its_optimizer_partitions(tiny_sd3_path, tmp_path):
    """A ZeRO-2 checkpoint holds the full weights, the EMA and each rank's optimizer partition
    (``zero_optim_rank{r}.pt``): 2 ZeRO-2 ranks resuming it after epoch 1 reproduce the uninterrupted 2-epoch run
    (weights, EMA, AdamW step count). Without the partitions (another number of ranks) ZeRO-2 restarts AdamW, as does
    1 process without DeepSpeed: those two train the same second epoch, which differs from the exact one."""
    import shutil

    from flowrl.models.sd3 import load_denoiser_state

    (tmp_path / "driver.py").write_text(DS_DRIVER)
    (tmp_path / "flat_reward.py").write_text(REWARD)

    def torchrun(out, *extra):
        return _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                     "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(tmp_path / "driver.py"),
                     tiny_sd3_path, str(tmp_path / out), str(tmp_path / f"{out}.pt"), "trainer.deepspeed_zero=2",
                     *extra], timeout=400)

    def weights(out, sub):
        return load_denoiser_state(tmp_path / out / "checkpoints" / "final" / sub)

    torchrun("a")
    ck = tmp_path / "a" / "checkpoints" / "final"
    st = torch.load(ck / "trainer_state.pt", weights_only=False)
    assert st["finetune"] == "full" and st["optimizer"] is None and st["opt_steps"] == 1 and st["zero_optim"] == 2
    assert sorted(f.name for f in ck.glob("zero_optim_rank*.pt")) == ["zero_optim_rank0.pt", "zero_optim_rank1.pt"]
    assert not list(ck.parent.glob("*.tmp"))
    torchrun("full", "trainer.epochs=2")  # uninterrupted
    log = torchrun("b", "trainer.epochs=2", f"trainer.resume={ck}")
    assert "resumed the weights, the EMA and the optimizer state (AdamW moments, partitioned over 2 ranks)" in log
    # the same checkpoint without the partitions (as if saved on another number of ranks): AdamW restarts
    ck2 = tmp_path / "a2"
    shutil.copytree(ck, ck2)
    for f in ck2.glob("zero_optim_rank*.pt"):
        f.unlink()
    log = torchrun("b2", "trainer.epochs=2", f"trainer.resume={ck2}")
    assert "the optimizer state (AdamW moments) restarts from zero (the checkpoint holds no ZeRO-2 optimizer" in log
    log = _run([sys.executable, str(tmp_path / "driver.py"), tiny_sd3_path, str(tmp_path / "c"),
                str(tmp_path / "c.pt"), "trainer.epochs=2", f"trainer.resume={ck}"])
    assert "has no optimizer state (saved under DeepSpeed ZeRO-2): AdamW restarts" in log
    rec = {k: torch.load(tmp_path / f"{k}.pt", weights_only=False) for k in ("full", "b", "b2", "c")}
    assert rec["full"]["adam_step"] == rec["b"]["adam_step"] == 2.0  # the AdamW step count was restored
    assert rec["b2"]["adam_step"] == rec["c"]["adam_step"] == 1.0  # restarted
    w_a = load_denoiser_state(ck / "transformer")
    for sub in ("transformer", "transformer_ema"):
        w = {k: weights(k, sub) for k in ("full", "b", "b2", "c")}
        dev = lambda x, y: max((w[x][k] - w[y][k]).abs().max().item() for k in w[x])  # noqa: E731
        moved = max((w["b"][k] - w_a[k]).abs().max().item() for k in w_a)
        print(f"{sub}: exact resume vs uninterrupted max |Δw| {dev('b', 'full'):.2e}; restarted AdamW vs "
              f"uninterrupted {dev('b2', 'full'):.2e}; restarted ZeRO-2 vs 1 process {dev('b2', 'c'):.2e}; "
              f"the second epoch moved {moved:.2e}")
        assert dev("b", "full") <= 1e-7 and moved > 1e-4, sub
        assert dev("b2", "c") < 1e-5, sub
        assert dev("b2", "full") > 1e-5, sub  # restarting AdamW does not reproduce the uninterrupted run
