"""Two CPU processes (torchrun, gloo, DDP) train like one process with the same global batch.

The EBT's training is second order; DDP must average its gradients exactly like one process
sums a batch. Compared per step: the global loss and the global gradient norm (before
clipping: an un-averaged gradient shows up as a different norm even where Adam's update would
hide it), then the weights after the last step. Tolerance: relative 1e-4 on losses and norms,
absolute 1e-4 on weights (float32 reductions in a different order; measured differences ~1e-6).
Then the two-process run resumes (its last checkpoint and export removed, as if killed): every
process loads the checkpoint the main process chose and its own RNG state, and the steps after
the checkpoint repeat exactly.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import loop
from train.checkpoint import checkpoints

REPO = Path(__file__).resolve().parents[1]
RUN = ["train.max_steps=4", "checkpoint.every=2", "eval.every=4"]


def _weights(out):
    return load_file(checkpoints(out / "checkpoints")[-1] / "model.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, train_overrides, tiny_run, run_metrics):
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "-m",
        "train",
        f"output_dir={two}",
        *train_overrides,
        *RUN,
        "train.micro_batch_size=2",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    loop.Trainer(tiny_run(one, *RUN, "train.micro_batch_size=4")).run()  # one micro-batch of 4 rows

    got, want = run_metrics(two), run_metrics(one)
    assert '"world_size": 2' in (checkpoints(two / "checkpoints")[-1] / "trainer_state.json").read_text()
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]  # same global batch
    for key in ("loss", "objective", "grad_norm", "val/loss"):
        a = [r[key] for r in got if key in r]
        b = [r[key] for r in want if key in r]
        assert a and a == pytest.approx(b, rel=1e-4), key
    wa, wb = _weights(two), _weights(one)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wb) < 1e-4
    assert (two / "final" / "model.safetensors").is_file()

    shutil.rmtree(two / "final")
    shutil.rmtree(checkpoints(two / "checkpoints")[-1])
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "checkpoint-00000002 at step 2" in r.stdout
    again = run_metrics(two)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for key in ("loss", "objective", "grad_norm", "val/loss"):
        assert [r.get(key) for r in again] == [r.get(key) for r in got], key  # exact: same processes, same order
    assert all(torch.equal(v, wa[k]) for k, v in _weights(two).items())
