"""Run folders and checkpoints: atomic writes, rotation, validation, resume.

Layout of ``OUTPUT/``::

    run_config.yaml            the resolved config; a different run may not reuse the folder
    tokenizer/                 built once, re-used on resume
    metrics.jsonl              one line per step (and per validation)
    checkpoints/checkpoint-00000100/
        model.safetensors, optimizer.bin, custom_checkpoint_0.pkl (scheduler),
        random_states_<rank>.pkl          (Accelerate's save_state)
        process_<rank>.json, replay_<rank>.safetensors   (data position, replay buffer)
        trainer_state.json                written last: marks the checkpoint complete
    final/                     Hub-style export

A checkpoint is written under ``checkpoint-N.tmp`` and renamed when complete, so a crash (or
SIGKILL) mid-save leaves the previous checkpoints intact and the partial one is never resumed
from. Checkpoints assume a filesystem shared by all processes (and nodes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.utils import load as load_pickle

from train.config import RunConfig, dump_yaml, flat, to_dict
from train.replay import ReplayBuffer

PREFIX = "checkpoint-"
STATE = "trainer_state.json"
# Keys that may differ when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = ("checkpoint.resume", "checkpoint.keep_last", "train.log_every", "hub.")


class CheckpointError(RuntimeError):
    """A run folder or checkpoint that cannot be used; the message says what to do instead."""


def checkpoints(root: Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def prepare_output(out: Path, cfg: RunConfig) -> Path | None:
    """Decide between a fresh run and a resume, refusing anything that would overwrite another run.

    Read-only (every process may call it); returns the checkpoint to resume from, or None.
    """
    saved = out / "run_config.yaml"
    ckpts = checkpoints(out / "checkpoints")
    if out.exists() and any(out.iterdir()) and not saved.exists():
        raise CheckpointError(
            f"output_dir {out} is not empty and holds no run_config.yaml: it is not a run folder of "
            f"python -m train; choose another output_dir (nothing was written)"
        )
    if saved.exists():
        old = flat(yaml.safe_load(saved.read_text()))
        new = flat(to_dict(cfg))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
            raise CheckpointError(
                f"output_dir {out} holds another run (its config differs: {shown}); choose another "
                f"output_dir, or repeat that run's config to resume it (nothing was written)"
            )
    resume = cfg.checkpoint.resume
    if resume == "never":
        if saved.exists():
            raise CheckpointError(
                f"checkpoint.resume=never but output_dir {out} already holds this run; use another "
                f"output_dir for a fresh start, or checkpoint.resume=auto to continue it"
            )
        return None
    if resume == "auto":
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint folder; omit it to resume the latest")
    return path


def is_finished(out: Path, checkpoint: Path, max_steps: int) -> bool:
    """True when ``checkpoint`` is the run's last step and the run was exported (``OUTPUT/final``).

    A run killed between its last checkpoint and the export is not finished: resuming it evaluates
    and exports without training. An unreadable checkpoint is left to :func:`load` to report.
    """
    try:
        step = json.loads((checkpoint / STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return step >= max_steps and (out / "final").is_dir()


def write_run_config(out: Path, cfg: RunConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "run_config.yaml").exists():
        (out / "run_config.yaml").write_text(dump_yaml(cfg))


def discard_fresh_run(out: Path, created: bool) -> None:
    """Undo a fresh run that failed in setup, so the corrected command can use the folder.

    Safe because :func:`prepare_output` only lets a fresh run start in an empty folder or one
    holding an earlier attempt of the very same run that never reached a checkpoint.
    """
    shutil.rmtree(out, ignore_errors=True)
    if not created:
        out.mkdir(parents=True)


def save(
    accelerator: Accelerator,
    root: Path,
    step: int,
    state: dict,
    process_state: dict,
    replay: ReplayBuffer | None,
    keep_last: int,
) -> Path:
    """Save everything needed to continue exactly (all processes call this)."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    (tmp / f"process_{rank}.json").write_text(json.dumps(process_state))
    if replay is not None:
        replay.save(tmp / f"replay_{rank}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(dict(state, world_size=accelerator.num_processes)))
        if final.exists():  # the same step saved before a crash: this one is as good
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path, replay: ReplayBuffer | None) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler, RNG, replay buffer; return (trainer state, process state)."""
    rank = accelerator.process_index
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({e}); {_advice(path)}") from None
    if state.get("world_size") != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {state.get('world_size')} processes; resume it with the same "
            f"number (per-process RNG and replay buffers are part of an exact resume)"
        )
    needed = ["model.safetensors", f"random_states_{rank}.pkl", f"process_{rank}.json"]
    needed += [f"replay_{rank}.safetensors"] if replay is not None else []
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; {_advice(path)}")
    try:
        load_pickle(path / f"random_states_{rank}.pkl")  # Accelerate only logs an unreadable RNG file
        accelerator.load_state(str(path))
        process_state = json.loads((path / f"process_{rank}.json").read_text())
        if replay is not None:
            replay.load(path / f"replay_{rank}.safetensors", accelerator.device)
    except Exception as e:  # noqa: BLE001 - safetensors/torch/json raise many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); {_advice(path)}") from None
    return state, process_state


def _advice(path: Path) -> str:
    return (
        f"resume an older one with checkpoint.resume=PATH (see {path.parent}), or move this one away; nothing was overwritten"
    )
