"""Two CPU processes (torchrun, gloo) train like one process with the same global batch: under DDP
and under each sharded mode (``train.sharding``: zero, fsdp_grad_op, fsdp_full).

The EBT's training is second order; DDP must average its gradients exactly like one process
sums a batch. Compared per step: the global loss and the global gradient norm (before
clipping: an un-averaged gradient shows up as a different norm even where Adam's update would
hide it), then the weights after the last step. Tolerance: relative 1e-4 on losses and norms,
absolute 1e-4 on weights (float32 reductions in a different order; measured differences ~1e-6).
Then the two-process run resumes (its last checkpoint and export removed, as if killed): every
process loads the checkpoint the main process chose and its own RNG state, and the steps after
the checkpoint repeat exactly. The sharded modes write the same checkpoint format (full weights
and optimiser state, gathered), so their checkpoints and export equal DDP's, and they resume the
same way.
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


def _torchrun(out, overrides, *extra):
    return ["torchrun", "--nproc_per_node", "2", "-m", "train", f"output_dir={out}", *overrides, *RUN, *extra]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, train_overrides, tiny_run, run_metrics):
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _torchrun(two, train_overrides, "train.micro_batch_size=2")
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("mode", ["zero", "fsdp_grad_op", "fsdp_full"])
def test_each_sharded_mode_matches_one_process_and_resumes_exactly(mode, tmp_path, train_overrides, tiny_run, run_metrics):
    """Sharded with 2 processes (2 micro-batches of 1 row each, accumulated: FSDP reduce-scatters each one)
    = one process with the same global batch; its checkpoint holds full weights and optimiser state
    (the same names and shapes as one process's), its export loads; a resume repeats the steps exactly."""
    from transformers import AutoModelForCausalLM

    import ebt  # noqa: F401 - registers the EBT with the Auto classes

    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _torchrun(two, train_overrides, "train.micro_batch_size=1", "train.grad_accum_steps=2", f"train.sharding={mode}")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    loop.Trainer(tiny_run(one, *RUN, "train.micro_batch_size=4")).run()

    got, want = run_metrics(two), run_metrics(one)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for key in ("loss", "objective", "grad_norm", "alpha", "val/loss"):
        a = [r[key] for r in got if key in r]
        b = [r[key] for r in want if key in r]
        assert a and a == pytest.approx(b, rel=1e-4), key
    wa, wb = _weights(two), _weights(one)
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wb)  # full weights, not shards
    assert max((wa[k] - wb[k]).abs().max().item() for k in wb) < 1e-4
    oa = load_file(checkpoints(two / "checkpoints")[-1] / "optimizer.safetensors")
    ob = load_file(checkpoints(one / "checkpoints")[-1] / "optimizer.safetensors")
    assert oa.keys() == ob.keys() and all(oa[k].shape == ob[k].shape for k in ob)  # the full AdamW state
    assert max((oa[k].float() - ob[k].float()).abs().max().item() for k in ob) < 1e-4
    exported = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    assert all(torch.equal(exported[k], wa[k]) for k in wa)

    shutil.rmtree(two / "final")
    shutil.rmtree(checkpoints(two / "checkpoints")[-1])
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-00000002 at step 2" in r.stdout
    again = run_metrics(two)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for key in ("loss", "objective", "grad_norm", "val/loss"):
        assert [r.get(key) for r in again] == [r.get(key) for r in got], key
    assert all(torch.equal(v, wa[k]) for k, v in _weights(two).items())
    if mode != "fsdp_full":
        return
    # The checkpoint format is the same in every mode: an FSDP run resumes under DDP (train.sharding may change).
    shutil.rmtree(two / "final")
    shutil.rmtree(checkpoints(two / "checkpoints")[-1])
    r = subprocess.run(cmd[:-1] + ["train.sharding=none"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-00000002 at step 2" in r.stdout and "train.sharding 'fsdp_full' -> 'none'" in r.stdout
    moved = run_metrics(two)
    for key in ("loss", "objective", "grad_norm", "val/loss"):
        pairs = [(a.get(key), b.get(key)) for a, b in zip(moved, got, strict=True)]
        assert all((a is None) == (b is None) for a, b in pairs), key  # logged at the same steps
        assert [a for a, _ in pairs if a is not None] == pytest.approx([b for _, b in pairs if b is not None], rel=1e-4), key
    assert max((v - wa[k]).abs().max().item() for k, v in _weights(two).items()) < 1e-4
