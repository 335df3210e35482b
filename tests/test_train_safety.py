"""Training runs that cannot be poisoned, raced or tampered with (issue 11).

Each test names the issue's item it covers. Runs are in-process (``train.__main__.main`` for exit
codes and messages) on the tiny config of ``conftest.py``, mostly with the Llama twin (the
fastest model: these tests are about the trainer, not the EBT).
"""

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train import checkpoint as C
from train import loop
from train.__main__ import main
from train.checkpoint import checkpoints
from train.config import ConfigError, ebt_config, load_config

LLAMA = ["model.kind=llama"]
REPO = Path(__file__).resolve().parents[1]


def _main(out: Path, overrides: list[str], *extra: str) -> int:
    return main([f"output_dir={out}", *overrides, *extra])


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dirs(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_dir())


def _error_lines(err: str) -> list[str]:
    """The ``error: ...`` lines of a captured stderr (progress bars also write there)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _flip(path: Path, at: int = -64) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _rehash(ckpt: Path) -> None:
    """Rewrite a checkpoint's manifest to match its (changed) files: what an attacker with write access could do."""
    (ckpt / C.MANIFEST).unlink()
    C.write_manifest(ckpt)


def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


# ---------------------------------------------------------------- no pickle on the load path (item 1)
class _Evil:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(tmp_path, train_overrides, capsys):
    out, marker = tmp_path / "r", tmp_path / "executed"
    args = [*LLAMA, "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=3"]
    assert _main(out, train_overrides, *args) == 0
    shutil.rmtree(out / "final")  # as if killed before the export: a re-run resumes
    first, second, latest = checkpoints(out / "checkpoints")
    payload = pickle.dumps(_Evil(str(marker)))
    (latest / "custom_checkpoint_0.pkl").write_bytes(payload)  # Accelerate's load_state unpickled it (scheduler)
    capsys.readouterr()
    code = _main(out, train_overrides, *args)
    assert not marker.exists()
    assert code == 0
    assert (
        f"checkpoint {latest} is not usable (it holds custom_checkpoint_0.pkl, which the trainer never writes "
        f"(checkpoints hold no .pkl or .bin files)); resuming from {second} instead" in capsys.readouterr().out
    )
    # a pickle under a name the trainer writes, with a manifest rewritten to match it
    shutil.rmtree(out / "final")
    torch.save(_Evil(str(marker)), latest / "model.safetensors")
    _rehash(latest)
    assert _main(out, train_overrides, *args) == 0
    assert not marker.exists()
    assert f"checkpoint {latest} is not usable (model.safetensors is unreadable" in capsys.readouterr().out
    # every checkpoint tampered with: a clear error, exit 2, still nothing executed
    shutil.rmtree(out / "final")
    for ckpt in checkpoints(out / "checkpoints"):
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
            (ckpt / name).write_bytes(payload)
        torch.save(_Evil(str(marker)), ckpt / "optimizer.bin")
    assert _main(out, train_overrides, *args) == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert f"no intact checkpoint in {out / 'checkpoints'}" in error and not marker.exists()
    assert not (out / "final").exists() and first.is_dir()


def test_the_trainer_has_no_pickle_load_path():
    """No unpickling call anywhere in train/: torch.load, pickle, Accelerate's load_state."""
    for path in sorted((REPO / "train").glob("*.py")):
        code = path.read_text()
        assert not re.search(r"torch\.load\(|import pickle|pickle\.load|\.load_state\(|load_pickle", code), path.name


# ---------------------------------------------------------------- integrity (item 2)
def test_flipped_bytes_are_detected_and_final_is_never_exported_from_them(tmp_path, train_overrides, capsys):
    out = tmp_path / "r"
    args = [*LLAMA, "train.max_steps=4", "checkpoint.every=2"]
    assert _main(out, train_overrides, *args) == 0
    reference = load_file(out / "final" / "model.safetensors")
    older, latest = checkpoints(out / "checkpoints")
    _flip(latest / "model.safetensors")
    # a finished run: the re-run says so and exports nothing
    exported = _files(out / "final")
    capsys.readouterr()
    assert _main(out, train_overrides, *args) == 0
    assert "is finished" in capsys.readouterr().out and _files(out / "final") == exported
    # killed before its export: the damage is found, the older checkpoint resumed, the same weights exported
    shutil.rmtree(out / "final")
    assert _main(out, train_overrides, *args) == 0
    assert (
        f"checkpoint {latest} is not usable (model.safetensors: SHA-256 differs from its manifest "
        f"(the file was changed or damaged)); resuming from {older} instead" in capsys.readouterr().out
    )
    again = load_file(out / "final" / "model.safetensors")
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)
    # optimiser state damaged in every checkpoint: exit 2, nothing exported, nothing changed
    shutil.rmtree(out / "final")
    for ckpt in checkpoints(out / "checkpoints"):
        _flip(ckpt / "optimizer.safetensors", at=-8)
    before = _files(out)
    assert _main(out, train_overrides, *args) == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert "no intact checkpoint" in error and "optimizer.safetensors: SHA-256 differs from its manifest" in error
    assert not (out / "final").exists() and _files(out) == before


# ---------------------------------------------------------------- non-finite weights (item 3)
def test_an_update_that_makes_weights_nan_never_reaches_a_checkpoint_or_final(
    tmp_path, train_overrides, monkeypatch, capsys, run_metrics
):
    real = loop.build_optimizer

    def poisoned(model, cfg):  # the 4th update leaves a NaN in the embedding
        optimizer = real(model, cfg)
        updates = {"n": 0}

        def after_step(*_):
            updates["n"] += 1
            if updates["n"] == 4:
                with torch.no_grad():
                    model.get_input_embeddings().weight.view(-1)[0] = float("nan")

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", poisoned)
    out = tmp_path / "r"
    assert _main(out, train_overrides, *LLAMA, "checkpoint.every=1", "checkpoint.keep_last=10") == 3
    (error,) = _error_lines(capsys.readouterr().err)
    assert "step 4's update: non-finite weights or optimiser state (parameter model.embed_tokens.weight)" in error
    assert [p.name for p in checkpoints(out / "checkpoints")] == [f"checkpoint-0000000{i}" for i in (1, 2, 3)]
    for ckpt in checkpoints(out / "checkpoints"):
        assert _finite(ckpt / "model.safetensors") and _finite(ckpt / "optimizer.safetensors")
    assert not (out / "final").exists() and [r["step"] for r in run_metrics(out)] == [1, 2, 3]


def test_a_poisoned_optimizer_state_stops_the_run_before_any_save(tmp_path, train_overrides, capsys):
    out = tmp_path / "r"
    args = [*LLAMA, "checkpoint.every=1", "checkpoint.keep_last=5"]
    assert _main(out, train_overrides, *args, "train.max_steps=2") == 0
    exported = _files(out / "final")
    ckpt = checkpoints(out / "checkpoints")[-1]
    state = load_file(ckpt / "optimizer.safetensors")  # garbled: negative second moments (sqrt -> NaN)
    save_file({k: -v.abs() - 1 if k.endswith("exp_avg_sq") else v for k, v in state.items()}, ckpt / "optimizer.safetensors")
    _rehash(ckpt)
    capsys.readouterr()
    assert _main(out, train_overrides, *args, "train.max_steps=4") == 3  # max_steps may grow on resume
    (error,) = _error_lines(capsys.readouterr().err)
    assert "step 3's update: non-finite weights or optimiser state" in error
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert _files(out / "final") == exported  # the earlier export is not replaced


def test_no_checkpoint_inside_a_skip_streak_and_a_run_ending_in_one_is_not_exported(
    tmp_path, tiny_run, monkeypatch, run_metrics, capsys
):
    real = loop.build_model
    bad_forwards: set[int] = set()

    def poisoned(*args):
        model = real(*args)
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += module.training
            if module.training and calls["n"] in bad_forwards:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    bad_forwards.update({4})  # step 4 skipped: its checkpoint is written after step 5 instead
    out = tmp_path / "a"
    loop.Trainer(tiny_run(out, *LLAMA, "checkpoint.every=2", "checkpoint.keep_last=5")).run()
    assert [r.get("skipped", 0) for r in run_metrics(out)] == [0, 0, 0, 1, 0, 0]
    assert [p.name[-1] for p in checkpoints(out / "checkpoints")] == ["2", "5", "6"]
    assert "step 4: checkpoint deferred" in capsys.readouterr().out
    bad_forwards.clear()
    bad_forwards.update({6})  # the last step skipped: no final checkpoint, no export, exit 3
    out = tmp_path / "b"
    with pytest.raises(loop.NonFiniteLoss, match="ended in 1 consecutive non-finite step"):
        loop.Trainer(tiny_run(out, *LLAMA, "checkpoint.every=2", "checkpoint.keep_last=5")).run()
    assert [p.name[-1] for p in checkpoints(out / "checkpoints")] == ["2", "4"]
    assert not (out / "final").exists()


# ---------------------------------------------------------------- the run lock (item 6)
def test_a_second_run_on_a_locked_folder_exits_2_at_once(tmp_path, train_overrides, tiny_run, capsys, monkeypatch):
    out = tmp_path / "r"
    holder = loop.Trainer(tiny_run(out, *LLAMA))  # holds the folder until its run ends
    before = _files(out)

    def no_data_work(*args, **kwargs):
        raise AssertionError("the refused run read data: the lock must be checked before any work")

    with monkeypatch.context() as patch:  # "at once": refused before any data (or model) work
        patch.setattr(loop.D, "read_split", no_data_work)
        assert _main(out, train_overrides, *LLAMA) == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert f"output_dir {out} is in use by another training run (PID {os.getpid()} on host" in error
    assert _files(out) == before and (out / "train.lock").read_text().split()[0] == str(os.getpid())
    holder.run()
    assert not (out / "train.lock").exists()  # released (and removed) when the run ends
    # another process holds it: refused, naming that PID; once it is SIGKILLed its lock is gone with it
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.write(fd, b'%d elsewhere' % os.getpid()); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out / "train.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert _main(out, train_overrides, *LLAMA) == 2
        (error,) = _error_lines(capsys.readouterr().err)
        assert f"(PID {proc.pid} on host elsewhere holds {out / 'train.lock'})" in error
    finally:
        proc.kill()
        proc.wait()
    assert (out / "train.lock").exists()  # left behind by the killed holder: not held by anyone
    assert _main(out, train_overrides, *LLAMA) == 0 and "is finished" in capsys.readouterr().out
    assert not (out / "train.lock").exists()


# ---------------------------------------------------------------- failed starts delete nothing (item 5)
@pytest.mark.parametrize("stopped_at", [2, 5], ids=["before-first-checkpoint", "after-a-checkpoint"])
def test_a_failed_rerun_leaves_every_preexisting_file(tmp_path, train_overrides, monkeypatch, stopped_at):
    text = tmp_path / "book.txt"
    text.write_text("A few plain sentences, repeated to give a tiny run enough blocks. " * 200)
    out = tmp_path / "r"
    args = [*LLAMA, f"data.source={text}"]
    real = loop.Trainer.train_step

    def interrupted(self):
        if self.step + 1 == stopped_at:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _main(out, train_overrides, *args)
    monkeypatch.undo()
    assert bool(checkpoints(out / "checkpoints")) == (stopped_at > 3)
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "data.csv").write_text("a,b\n1,2\n")
    before, folders = _files(out), _dirs(out)
    text.rename(tmp_path / "moved.txt")  # the re-run fails: its data are gone
    assert _main(out, train_overrides, *args) == 2
    assert _files(out) == before and _dirs(out) == folders


def test_a_failed_fresh_start_removes_only_what_it_created(tmp_path, tiny_run):
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(ValueError, match="no such file"):
        loop.Trainer(tiny_run(out, "data.source=/nope.txt"))
    assert out.is_dir() and not any(out.iterdir())  # the folder was there before: it stays
    nested = tmp_path / "a" / "b" / "c"
    with pytest.raises(ValueError, match="no such file"):
        loop.Trainer(tiny_run(nested, "data.source=/nope.txt"))
    assert not (tmp_path / "a").exists()  # created by this start: removed with it


# ---------------------------------------------------------------- config values (items 4, 9)
@pytest.mark.parametrize("value", ["-1e-3", "0", "-0.5", ".nan", "nan", ".inf", "1e999", "-.inf"])
def test_learning_rate_must_be_positive_and_finite(value):
    with pytest.raises(ConfigError, match=r"^train\.lr must be (> 0|a finite number), got \S+$"):
        load_config(None, [f"train.lr={value}"])


def test_float_settings_are_coerced_and_validated_with_one_line_exit_2(tmp_path, train_overrides, capsys):
    for spelling in ("1e-3", "1.0e-3", "'1e-3'", "0.001", "1E-3"):
        lr = load_config(None, [f"train.lr={spelling}"]).train.lr
        assert lr == 0.001 and isinstance(lr, float), spelling
    bad = {
        "train.beta1=1.0": "train.beta1 must be in [0, 1), got 1.0",
        "train.weight_decay=.nan": "train.weight_decay must be a finite number, got nan",
        "train.min_lr_ratio=2": "train.min_lr_ratio must be in [0, 1], got 2.0",
        "train.grad_clip=-1": "train.grad_clip must be >= 0 (0: no clipping), got -1.0",
        "data.val_fraction=.inf": "data.val_fraction must be a finite number, got inf",
        "train.replay_fraction=1e999": "train.replay_fraction must be a finite number, got inf",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert str(e.value) == message
    out = tmp_path / "r"
    assert _main(out, train_overrides, "train.lr=-1e-3") == 2
    assert _error_lines(capsys.readouterr().err) == ["error: train.lr must be > 0, got -0.001"]
    assert not out.exists()


def test_model_floats_in_any_yaml_spelling(tmp_path, train_overrides, capsys):
    cfg = load_config(None, ["model.ebt.step_size=1e30", "model.ebt.langevin_noise=1e-1"])
    assert cfg.model.ebt == {"step_size": 1e30, "langevin_noise": 0.1}
    assert ebt_config(cfg.model, vocab_size=64).step_size == 1e30
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  ebt:\n    step_size: 1e30\n    inference_step_size: 2e0\n")  # PyYAML: strings
    assert load_config(path).model.ebt == {"step_size": 1e30, "inference_step_size": 2.0}
    for value, shown in (("1e999", "inf"), (".nan", "nan"), ("-.inf", "-inf")):
        with pytest.raises(ConfigError, match=rf"^model\.ebt\.step_size must be a finite number, got {shown}$"):
            load_config(None, [f"model.ebt.step_size={value}"])
    # a finite but absurd step size trains into the non-finite policy: a message and exit 3, no traceback
    out = tmp_path / "r"
    assert _main(out, train_overrides, "model.ebt.step_size=1e30", "train.max_steps=3") == 3
    (error,) = _error_lines(capsys.readouterr().err)
    assert "consecutive non-finite steps" in error and not (out / "final").exists()


# ---------------------------------------------------------------- resumable changes, the documented recovery (item 7)
def test_lowering_the_learning_rate_then_resuming_recovers(tmp_path, train_overrides, capsys, run_metrics):
    out = tmp_path / "r"
    base = [*LLAMA, "checkpoint.every=1", "checkpoint.keep_last=5", "train.max_nonfinite_steps=2"]
    assert _main(out, train_overrides, *base, "train.max_steps=2") == 0  # a good start
    exported = _files(out / "final")
    # more steps with a far too high learning rate: the weights blow up, the streak stops the run
    assert _main(out, train_overrides, *base, "train.max_steps=6", "train.lr=1e30") == 3
    (error,) = _error_lines(capsys.readouterr().err)
    assert "checkpoint-00000003, written just before the streak, gave it and was set aside" in error
    assert f"lower train.lr and re-run the command (it resumes from {out / 'checkpoints' / 'checkpoint-00000002'})" in error
    assert _files(out / "final") == exported  # never exported from the blown-up weights
    assert (out / "checkpoints" / "checkpoint-00000003.nonfinite").is_dir()
    # the documented recovery: lower train.lr, re-run
    assert _main(out, train_overrides, *base, "train.max_steps=6", "train.lr=1e-3") == 0
    assert "settings changed since the run's last start: train.lr 1e+30 -> 0.001" in capsys.readouterr().out
    rows = run_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and not any(r.get("skipped") for r in rows)
    assert rows[2]["changed"] == {"train.lr": [1e30, 1e-3]}
    cfg = load_config(None, [*train_overrides, *base, "train.max_steps=6", "train.lr=1e-3"]).train
    assert [r["lr"] for r in rows[2:]] == pytest.approx([1e-3 * loop.lr_factor(s, cfg) for s in range(2, 6)], rel=1e-12)
    assert _finite(out / "final" / "model.safetensors")
    assert load_config(out / "run_config.yaml").train.lr == 1e-3  # the run's config follows


def test_shape_and_data_order_settings_still_may_not_change(tmp_path, tiny_run):
    out = tmp_path / "r"
    loop.Trainer(tiny_run(out, *LLAMA, "train.max_steps=4", "checkpoint.every=2")).run()
    for change in ("train.micro_batch_size=2", "model.hidden_size=64", "train.seed=1", "data.block_size=16"):
        with pytest.raises(C.CheckpointError, match=f"holds another run .*{change.split('=')[0]}"):
            loop.Trainer(tiny_run(out, *LLAMA, "train.max_steps=4", "checkpoint.every=2", change))
    with pytest.raises(C.CheckpointError, match="is at step 4, beyond train.max_steps=3"):
        shutil.rmtree(out / "final")
        loop.Trainer(tiny_run(out, *LLAMA, "train.max_steps=3", "checkpoint.every=2"))
    assert not (out / "train.lock").exists()


# ---------------------------------------------------------------- a torn metrics line (item 8)
def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, tiny_run, run_metrics, capsys):
    args = [*LLAMA, "checkpoint.every=3", "checkpoint.keep_last=2"]
    reference = loop.Trainer(tiny_run(tmp_path / "ref", *args)).run()
    out = tmp_path / "r"
    loop.Trainer(tiny_run(out, *args)).run()
    # as if killed while writing step 6's line: no checkpoint 6, no export, half a line
    shutil.rmtree(out / "final")
    shutil.rmtree(checkpoints(out / "checkpoints")[-1])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:5]) + lines[5][:40])
    capsys.readouterr()
    final = loop.Trainer(tiny_run(out, *args)).run()
    assert f"note: dropped the torn last line of {out / 'metrics.jsonl'}" in capsys.readouterr().out
    untimed = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in run_metrics(out)]
    assert untimed == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in run_metrics(tmp_path / "ref")]
    assert final["val/loss"] == reference["val/loss"]
    # a damaged line inside the log is not guessed at: a clear error, nothing changed
    shutil.rmtree(out / "final")
    shutil.rmtree(checkpoints(out / "checkpoints")[-1])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in [*lines[:2], "{garbage", *lines[2:]]))
    before = _files(out)
    with pytest.raises(C.CheckpointError, match=r"metrics.jsonl line 3 is not a metrics row \('\{garbage'\); fix or remove"):
        loop.Trainer(tiny_run(out, *args)).run()
    assert _files(out) == before


# ---------------------------------------------------------------- model API checks (item 10; the checks live in ebt/)
@pytest.fixture(scope="module")
def tiny_model():
    from conftest import tiny_ebt_config

    from ebt import EBTForCausalLM

    torch.manual_seed(0)
    return EBTForCausalLM(tiny_ebt_config()).eval()


IDS = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda m: m.think(torch.tensor([[1, 11]])), "input_ids.*vocab_size=11"),  # one past the vocabulary
        (lambda m: m(torch.tensor([[-1, 2]])), "input_ids.*vocab_size=11"),
        (lambda m: m.think(torch.zeros(1, 0, dtype=torch.long)), r"input_ids has shape \(1, 0\)"),
        (lambda m: m.think(IDS, step_size=float("inf")), "step_size=inf"),
        (lambda m: m.think(IDS, noise=float("inf")), "noise=inf"),
        (lambda m: m.think(IDS, temperature=float("nan")), "temperature=nan"),
        (lambda m: m.think(IDS, tolerance=float("nan")), "tolerance=nan"),
        (lambda m: m.generate(IDS, max_new_tokens=2, think_noise=float("inf")), "noise=inf"),
        (lambda m: m.generate(IDS, max_new_tokens=2, think_step_size=float("nan")), "step_size=nan"),
        (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2), "at least one token"),
    ],
    ids=["id-too-large", "id-negative", "empty", "step_size", "noise", "temperature", "tolerance", "generate-noise",
         "generate-step_size", "generate-empty"],
)  # fmt: skip
def test_model_api_rejects_bad_inputs_naming_the_argument(tiny_model, call, names):
    with torch.no_grad(), pytest.raises(ValueError, match=names):
        call(tiny_model)


# ---------------------------------------------------------------- bad resume paths and output folders (item 11)
def test_resume_path_of_another_model_size_is_one_clear_line(tmp_path, train_overrides, capsys):
    a = tmp_path / "a"
    assert _main(a, train_overrides, *LLAMA, "train.max_steps=3") == 0
    ckpt = checkpoints(a / "checkpoints")[-1]
    b = tmp_path / "b"
    capsys.readouterr()
    assert _main(b, train_overrides, *LLAMA, "model.hidden_size=64", f"checkpoint.resume={ckpt}") == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert f"error: checkpoint {ckpt} does not fit this run's model: model.embed_tokens.weight is (" in error
    assert ", 32) there and (" in error and ", 64) here" in error and "corrupt" not in error
    assert not b.exists()  # no half-made folder: the corrected command is not refused
    assert _main(b, train_overrides, *LLAMA, f"checkpoint.resume={ckpt}") == 0
    assert f"resumed from {ckpt} at step 3" in capsys.readouterr().out


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path, train_overrides, capsys):
    file = tmp_path / "file"
    file.write_text("mine")
    assert _main(file, train_overrides) == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"error: output_dir {file} is a file, not a folder; choose a folder path (nothing was written)"
    ]
    assert _main(file / "run", train_overrides) == 2
    (error,) = _error_lines(capsys.readouterr().err)
    assert f"error: cannot create output_dir {file / 'run'}: Not a directory" in error
    assert file.read_text() == "mine"
