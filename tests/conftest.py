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


# --- eval helpers (eval tests) ---

FLOAT32_EPS = torch.finfo(torch.float32).eps
# The longest dot product in the eval tests' tiny models (widths 16-32, SwiGLU 24-64, vocabularies
# and contexts <= 64): the K of the float32 rounding bound below.
DOT_LENGTH = 64


def loglik_tolerance(tokens: int, logit_scale: float) -> float:
    """Absolute tolerance for a sum of ``tokens`` log-likelihoods computed by two float32 paths
    that batch differently (other padding or batch size, so other kernel blocking and summation
    order; other CPU kernel families too).

    Each term is ``log_softmax(z)[y]`` of float32 logits ``z``. A K-term float32 dot product is
    exact to ``K * eps`` relative to the sum of its terms' magnitudes (Higham's gamma_K), so each
    path's logits are off by at most ``K * eps * max|z|``; the difference of two paths by twice
    that, and one log-softmax (the logit and the log-sum-exp) by twice again. n terms add up.
    ``K = DOT_LENGTH``; ``logit_scale`` is the largest |logit| (at least 1: log-softmax itself
    works at unit scale). It holds only where the computation is continuous: settings whose
    result can jump at a tie (self-verification's lowest-energy choice, accept_decrease,
    tolerance, an argmax) need their margins checked apart (see ``assert_no_near_ties``).
    """
    return tokens * 4 * DOT_LENGTH * FLOAT32_EPS * max(float(logit_scale), 1.0)


def top_gap(values: torch.Tensor) -> torch.Tensor:
    """(...,) best minus second-best of ``values`` (..., N >= 2) along the last axis."""
    top = values.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def assert_no_near_ties(values: torch.Tensor, margin: float, what: str) -> None:
    """The best and second-best of ``values`` (..., N >= 2) along the last axis differ by more than
    ``margin`` everywhere, so rounding on another path or CPU cannot swap which one wins."""
    gap = float(top_gap(values).min())
    assert gap > margin, f"a near-tie in {what} (gap {gap:.3g} <= {margin:.3g}): rounding could flip it; pick other inputs"


def train_tiny_run(out: Path, *overrides: str) -> Path:
    """Run the project's trainer with ``overrides`` (dotted keys) into ``out``; returns ``out/final``."""
    from train.config import load_config
    from train.loop import Trainer

    Trainer(load_config(None, [f"output_dir={out}", *overrides])).run()
    return out / "final"


def save_checkpoint(folder: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved side by side as a Hub-style folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
