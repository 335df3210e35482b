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


def tiny_ebt_config(**overrides):
    """A tiny EBT config (2 layers, width 16, vocabulary 11); keyword arguments override fields."""
    from ebt import EBTConfig

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


@pytest.fixture
def tiny_config():
    """The ``tiny_ebt_config`` factory as a fixture."""
    return tiny_ebt_config


# --- training helpers (train tests) ---
# Owned by the training tests (test_train*.py); a model and data small enough for a few seconds per
# run on 2 CPU cores.
TRAIN_OVERRIDES = [
    "model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.max_position_embeddings=32", "data.block_size=32", "data.task_examples=150", "data.task_val_examples=10",
    "train.micro_batch_size=4", "train.max_steps=6", "train.warmup_steps=2", "train.mixed_precision=fp32",
    "eval.every=3", "eval.max_blocks=8", "eval.think_steps=[1,3]", "checkpoint.every=3", "train.log_every=1",
]  # fmt: skip


@pytest.fixture
def train_overrides() -> list[str]:
    """The tiny run's ``key=value`` overrides (also for ``python -m train`` subprocesses)."""
    return list(TRAIN_OVERRIDES)


@pytest.fixture
def tiny_run():
    """``tiny_run(out, *extra)``: the tiny run's config writing to ``out``, ``extra`` overrides last."""
    from train.config import load_config

    return lambda out, *extra: load_config(None, [f"output_dir={out}", *TRAIN_OVERRIDES, *extra])


@pytest.fixture
def run_metrics():
    """``run_metrics(out)``: the rows of ``out/metrics.jsonl``."""
    import json

    return lambda out: [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
