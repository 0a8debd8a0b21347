"""Epoch sampling: groups span ranks consistently, seeds do not depend on the rank layout, SDE windows per group."""

from __future__ import annotations

import torch

from flowrl.config import ModelConfig, TrainConfig
from flowrl.shapes.prompts import split_metadata
from flowrl.trainer import make_epoch, sample_seed, train_step_mask


def _cfg(**sampler) -> TrainConfig:
    cfg = TrainConfig(model=ModelConfig(pretrained="x"))
    cfg.trainer.group_size, cfg.trainer.groups_per_epoch = 6, 4
    for k, v in sampler.items():
        setattr(cfg.sampler, k, v)
    return cfg


def test_rank_slices_reassemble_the_single_process_epoch():
    train, _ = split_metadata()
    cfg = _cfg()
    one = make_epoch(cfg, train, epoch=3, rank=0, world=1)
    parts = [make_epoch(cfg, train, epoch=3, rank=r, world=3) for r in range(3)]
    assert sum((p.prompts for p in parts), []) == one.prompts
    assert torch.equal(torch.cat([p.group_ids for p in parts]), one.group_ids)
    assert sum((p.sample_ids for p in parts), []) == one.sample_ids
    # a group of 6 spans ranks of 8 samples: group 1 is split between rank 0 and rank 1
    assert set(parts[0].group_ids.tolist()) & set(parts[1].group_ids.tolist())
    for g in range(4):  # every sample of a group has the same prompt
        assert len({one.prompts[i] for i in range(24) if one.group_ids[i] == g}) == 1
    assert make_epoch(cfg, train, 4, 0, 1).prompts != one.prompts  # a new epoch draws new prompts


def test_tag_balanced_prompt_draws():
    train, _ = split_metadata()
    cfg = _cfg()
    cfg.trainer.groups_per_epoch, cfg.trainer.group_size = 600, 2
    tags = [m["tag"] for m in make_epoch(cfg, train, 0, 0, 1).metadata[::2]]
    counts = {t: tags.count(t) for t in set(tags)}
    assert len(counts) == 5 and min(counts.values()) > 80  # color_attr (90 % of prompts) does not dominate


def test_seeds_and_step_masks():
    assert sample_seed(0, 1, 5) != sample_seed(0, 1, 6) != sample_seed(0, 2, 5)
    assert train_step_mask(10, 0.99).tolist() == [True] * 9 + [False]
    train, _ = split_metadata()
    eb = make_epoch(_cfg(sde_window=2), train, 0, 0, 1)
    for g in range(4):
        rows = eb.noise_levels[eb.group_ids == g]
        assert (rows == rows[0]).all()  # one window per group
        assert int((rows[0] > 0).sum()) == 2 and (rows[0] > 0).nonzero()[0].item() < 5
    assert torch.equal(eb.train_mask, eb.noise_levels > 0)


def test_steps_per_sample_draws_a_random_subset_per_sample():
    train, _ = split_metadata()
    cfg = _cfg(timestep_fraction=0.8, steps_per_sample=3)
    eb = make_epoch(cfg, train, 0, 0, 1)
    allowed = train_step_mask(10, 0.8)
    assert (eb.train_mask.sum(1) == 3).all() and not eb.train_mask[:, ~allowed].any()
    assert len({tuple(r.tolist()) for r in eb.train_mask}) > 1  # different subsets across samples
    assert (eb.noise_levels > 0).all()  # the rollout stays stochastic at every step; only training is subsampled
    # The draw covers the whole epoch: rank slices reassemble the single-process masks.
    parts = [make_epoch(cfg, train, 0, r, 2).train_mask for r in range(2)]
    assert torch.equal(torch.cat(parts), eb.train_mask)
    # Across many samples every allowed step is used about equally often.
    cfg.trainer.groups_per_epoch = 200
    freq = make_epoch(cfg, train, 1, 0, 1).train_mask.float().mean(0)
    assert torch.allclose(freq[allowed], torch.full((8,), 3 / 8), atol=0.05)  # ±3.5 std at n = 1,200
    # With an SDE window, the subset lies inside the window.
    eb = make_epoch(_cfg(sde_window=2, steps_per_sample=1), train, 0, 0, 1)
    assert (eb.train_mask.sum(1) == 1).all() and not (eb.train_mask & (eb.noise_levels == 0)).any()


def test_mixgrpo_window_slides_with_the_epoch_and_rolls_back():
    """sampler.mixgrpo_window: one window for all groups, stochastic and trained inside, ODE outside; it moves by the
    stride every shift interval and returns to step 0 after the last full window inside steps 0..N-2."""
    train, _ = split_metadata()
    cfg = _cfg(noise_level=0.8, mixgrpo_window=3, mixgrpo_shift_interval=2, mixgrpo_stride=2)

    def window(epoch):
        eb = make_epoch(cfg, train, epoch, 0, 1)
        on = (eb.noise_levels > 0)
        assert (on == on[0]).all() and torch.equal(on, eb.train_mask)  # same window for every group; trained = SDE
        assert (eb.noise_levels[on] == 0.8).all()
        return torch.nonzero(on[0]).flatten().tolist()

    # 10 steps: starts 0, 2, 4, 6 (max start 10 - 1 - 3 = 6), each for 2 epochs, then back to 0
    assert [window(e) for e in (0, 1, 2, 4, 6, 7, 8)] == [[0, 1, 2], [0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8],
                                                        [6, 7, 8], [0, 1, 2]]


def test_step_levels_replace_the_constant_noise_level():
    train, _ = split_metadata()
    cfg = _cfg(noise_level=0.8)
    levels = torch.linspace(0.9, 0.0, 10)
    eb = make_epoch(cfg, train, 0, 0, 1, step_levels=levels)
    assert torch.allclose(eb.noise_levels, levels.expand_as(eb.noise_levels))
    assert not eb.train_mask[:, -1].any()  # level 0 and the last step: never trained
