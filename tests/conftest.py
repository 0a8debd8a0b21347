"""Shared fixtures: offline mode and a tiny random SD3 pipeline saved locally (built once per test session)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """Path of a randomly initialised tiny SD3 pipeline (real diffusers/transformers classes, ~2 M parameters)."""
    from flowrl.models.tiny_sd3 import tiny_random_pipeline

    return str(tiny_random_pipeline(tmp_path_factory.mktemp("models") / "tiny_sd3", seed=0))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_sd3_path):
    from flowrl.models.sd3 import SD3Adapter

    return SD3Adapter.from_pretrained(tiny_sd3_path, max_sequence_length=0, load_t5=False)
