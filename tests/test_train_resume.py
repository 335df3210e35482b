"""A run SIGKILLed after a checkpoint and resumed reproduces the uninterrupted run's losses exactly.

Uses the S2 recipe (random step counts and step sizes, Langevin noise, replay buffer) so that
RNG states and the replay buffer must be restored, not just weights and optimiser. While the
first run holds its folder a second one is refused (exit 2, naming its PID); the lock it leaves
when SIGKILLed is held by no one, so the resumed run takes it over.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import loop

REPO = Path(__file__).resolve().parents[1]
S2 = [
    "model.recipe=s2", "train.replay_buffer_size=8", "train.max_steps=16", "checkpoint.every=6", "eval.every=6",
    "eval.max_blocks=4",
]  # fmt: skip


def _launch(out, overrides):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # same arithmetic as in-process
    return subprocess.Popen(
        [sys.executable, "-m", "train", f"output_dir={out}", *overrides, *S2],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses_exactly(tmp_path, train_overrides, tiny_run, run_metrics, capsys):
    from train.__main__ import main

    out = tmp_path / "killed"
    proc = _launch(out, train_overrides)
    log = out / "metrics.jsonl"
    while proc.poll() is None:  # kill once step 8 is logged: checkpoint 6 exists, steps 7-8 are lost
        if log.exists() and any(r["step"] >= 8 for r in run_metrics(out)):
            proc.send_signal(signal.SIGSTOP)  # paused, still holding its folder: a second run is refused at once
            assert main([f"output_dir={out}", *train_overrides, *S2]) == 2
            assert f"is in use by another training run (PID {proc.pid} on host" in capsys.readouterr().err
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    assert not (out / "final").exists()
    assert (out / "train.lock").read_text().split()[0] == str(proc.pid)  # left behind, held by no one
    resumed = _launch(out, train_overrides)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert not (out / "train.lock").exists()

    reference = loop.Trainer(tiny_run(tmp_path / "ref", *S2)).run()
    got, want = run_metrics(out), run_metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, 17))  # lines after the checkpoint were dropped
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exact, not approximate
    assert [r["objective"] for r in got] == [r["objective"] for r in want]
    assert got[-1]["val/loss"] == reference["val/loss"]
