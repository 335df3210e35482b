"""Shared fixtures: tiny configurations and the location of the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores on CI: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(int(os.environ.get("EBT_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data_file(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared data folder (../shared/data) is not present beside the repo")
    return path


@pytest.fixture
def tiny_config():
    """A factory of tiny EBT configs; keyword arguments override the defaults."""
    from ebt import EBTConfig

    def make(**overrides):
        fields = dict(
            vocab_size=11,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            step_size=5.0,
        )
        fields.update(overrides)
        return EBTConfig(**fields)

    return make
