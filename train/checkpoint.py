"""Run folders and checkpoints: the run lock, atomic verified checkpoints, resume with fall-back.

Layout of ``OUTPUT/``::

    train.lock                 exists while a run holds the folder (holds its PID and host)
    run_config.yaml            the resolved config; a different run may not reuse the folder
    tokenizer/                 built once, re-used on resume
    metrics.jsonl              one line per step (and per validation)
    checkpoints/checkpoint-00000100/
        model.safetensors                       the model's full weights (gathered when sharded)
        optimizer.safetensors, optimizer.json   optimiser state, full (gathered): tensors / everything else
        process_<rank>.json                     data position, RNG scalars (python, numpy)
        process_<rank>.safetensors              RNG states (torch CPU and CUDA, numpy, python)
        replay_<rank>.safetensors               the process's replay buffer (S2 recipe)
        trainer_state.json                      step, tokens seen, number of processes
        manifest.json                           written last: every file's size and SHA-256
    final/                     Hub-style export

Nothing here is pickled, and nothing pickled is ever read: tensors are safetensors, the rest is
JSON; the learning-rate schedule is a pure function of the step (``train/loop.py``), so it has no
state to save. A checkpoint is written under ``checkpoint-N.tmp`` and renamed when complete (a
crash or SIGKILL mid-save leaves the previous checkpoints intact). Resuming verifies a
checkpoint against its manifest (no file missing, none added, sizes and SHA-256 equal, no
non-finite weight or optimiser value) and falls back to the newest intact one, saying what was
wrong with each newer one. Checkpoints assume a filesystem shared by all processes (and nodes).

The lock is ``fcntl.flock`` on ``OUTPUT/train.lock``, taken by the main process (global rank 0)
before anything is written and held until the run ends; the operating system drops it when
the process dies, however it dies, so a lock left by a killed run is simply taken over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from train.config import RunConfig, dump_yaml, flat, to_dict
from train.replay import ReplayBuffer

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

PREFIX = "checkpoint-"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ebt-train-checkpoint/1"
LOCK = "train.lock"
# Every file name a checkpoint may hold besides its manifest: anything else (a .pkl, a .bin) was
# not written by the trainer and makes the checkpoint unusable.
CHECKPOINT_FILE = re.compile(
    r"(model\.safetensors|optimizer\.safetensors|optimizer\.json|trainer_state\.json"
    r"|process_\d+\.json|process_\d+\.safetensors|replay_\d+\.safetensors)"
)
# Top-level entries a run writes in its folder: a start that fails removes those it created, and
# never touches any other entry (a user's own files).
RUN_ENTRIES = ("run_config.yaml", "tokenizer", "metrics.jsonl", "checkpoints", "tensorboard", "final", "final.tmp")
# Settings that may differ when a run is resumed: they change neither shapes nor the data order
# (the learning-rate schedule, the optimiser's scalars, the non-finite policy, validation,
# logging, checkpointing, the Hub). Keys, or section prefixes ending in ".".
RESUMABLE_CHANGES = (
    "output_dir",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.max_steps",
    "train.weight_decay",
    "train.beta1",
    "train.beta2",
    "train.grad_clip",
    "train.max_nonfinite_steps",
    "train.log_every",
    "train.sharding",  # every mode writes and reads the same full checkpoint (train/sharding.py)
    "eval.",
    "checkpoint.",
    "hub.",
)
NOT_LOGGED = ("checkpoint.resume", "output_dir")  # per-invocation instructions, not run settings


class CheckpointError(RuntimeError):
    """A run folder or checkpoint that cannot be used; the message says what to do instead."""


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def checkpoints(root: Path) -> list[Path]:
    """Completed checkpoints (renamed from ``.tmp``), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, allow_nan=False))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ====================================================================== the run lock
class RunLock:
    """An exclusive ``flock`` on ``OUTPUT/train.lock`` (see the module docstring)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        path = folder / LOCK
        if fcntl is None:  # pragma: no cover
            print(f"warning: no fcntl on this platform: {folder} is not locked against a second run")
            return cls(path, None)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                who = f"PID {holder[0]}" + (f" on host {holder[1]}" if len(holder) > 1 else "") if holder else "a process"
                raise CheckpointError(
                    f"output_dir {folder} is in use by another training run ({who} holds {path}); wait for it "
                    f"to finish or stop it, or choose another output_dir (nothing was written)"
                ) from None
            except OSError as e:  # a filesystem without flock: run, but say so
                os.close(fd)
                print(f"warning: cannot lock {path} ({e.strerror}): {folder} is not protected against a second run")
                return cls(path, None)
            try:  # a holder removes the file when it releases: the locked file must still be the one at the path
                same = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)
        raise CheckpointError(f"could not lock {path}: it kept being replaced by other processes")

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


# ====================================================================== opening a run folder
@dataclass
class Start:
    """What the main process decided about a run folder (broadcast to the other processes as JSON)."""

    resume: str | None = None  # checkpoint to resume from
    finished: bool = False
    changes: dict[str, list] = field(default_factory=dict)  # resumable key -> [old, new]
    notes: list[str] = field(default_factory=list)  # checkpoints skipped and why

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


class RunFolder:
    """The main process's hold on ``OUTPUT/``: its lock, and what this invocation created in it.

    :meth:`open` checks and locks the folder before anything is written; :meth:`abandon` undoes
    a start that failed: it removes only the run entries (:data:`RUN_ENTRIES`) this very
    invocation created, and the folder itself (and parents) only if it created them and they
    are empty. Anything else in the folder is never touched.
    """

    def __init__(self, out: Path):
        self.out = out
        self.lock: RunLock | None = None
        self.before: set[str] | None = None  # top-level entries when the lock was taken (None: not taken)
        self.created_root: Path | None = None  # the highest folder this invocation created

    def open(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"output_dir {out} is a file, not a folder; choose a folder path (nothing was written)")
        check_run_folder(out)
        if not out.is_dir():
            missing = out.absolute()
            while not missing.parent.exists():
                missing = missing.parent
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create output_dir {out}: {e.strerror or e} (nothing was written)") from None
            self.created_root = missing  # removed again only if empty: safe even if another run made it meanwhile
        try:
            self.lock = RunLock.acquire(out)
        except BaseException:
            self._remove_created_folders()
            raise
        # Under the lock nobody else writes here: what is here now is not this invocation's to remove.
        self.before = set(os.listdir(out))
        check_run_folder(out)  # again, under the lock: another run may have written meanwhile

    def abandon(self) -> None:
        """Undo a failed start (see the class docstring), then release the lock."""
        try:
            if self.before is not None:
                present = set(os.listdir(self.out)) if self.out.is_dir() else set()
                for name in sorted(present - self.before):
                    if name in RUN_ENTRIES:
                        path = self.out / name
                        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        finally:
            self.release()
            self._remove_created_folders()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _remove_created_folders(self) -> None:
        if self.created_root is None:
            return
        folder = self.out.absolute()
        while True:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                return
            if folder == self.created_root:
                return
            folder = folder.parent


def check_run_folder(out: Path) -> None:
    """Refuse a folder that holds things but is not a run folder of ``python -m train``."""
    if out.is_dir() and set(os.listdir(out)) - {LOCK} and not (out / "run_config.yaml").exists():
        raise CheckpointError(
            f"output_dir {out} is not empty and holds no run_config.yaml: it is not a run folder of "
            f"python -m train; choose another output_dir (nothing was written)"
        )


def prepare_output(out: Path, cfg: RunConfig, world_size: int) -> Start:
    """Decide between a fresh run, a resume and "finished", refusing anything that would overwrite another run.

    Called by the main process holding the lock; writes nothing. Returns the checkpoint to resume
    from (verified; newer damaged ones are skipped with a note), whether the run is finished,
    and which resumable settings changed.
    """
    saved = out / "run_config.yaml"
    start = Start()
    if saved.exists():
        try:
            old = flat(yaml.safe_load(saved.read_text()))
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{saved} is not a readable run config ({type(e).__name__}); restore or move it") from None
        new = flat(to_dict(cfg))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        fixed = [k for k in diff if not resumable(k)]
        if fixed:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fixed[:8])
            raise CheckpointError(
                f"output_dir {out} holds another run (its config differs: {shown}); choose another "
                f"output_dir, or repeat that run's config to resume it (nothing was written)"
            )
        start.changes = {k: [old.get(k), new.get(k)] for k in diff if k not in NOT_LOGGED}
    resume = cfg.checkpoint.resume
    if resume == "never":
        if saved.exists():
            raise CheckpointError(
                f"checkpoint.resume=never but output_dir {out} already holds this run; use another "
                f"output_dir for a fresh start, or checkpoint.resume=auto to continue it"
            )
        return start
    replay = bool(cfg.train.replay_buffer_size)
    max_steps = cfg.train.max_steps
    if resume == "auto":
        ckpts = checkpoints(out / "checkpoints")
        if not ckpts:
            return start
        if is_finished(out, ckpts[-1], max_steps):
            start.resume, start.finished = str(ckpts[-1]), True
            return start
        for ckpt in reversed(ckpts):
            problem = verify(ckpt, world_size, replay)
            if problem is None:
                start.resume = str(ckpt)
                break
            start.notes.append(f"checkpoint {ckpt} is not usable ({problem})")
        if start.resume is None:
            raise CheckpointError(
                f"no intact checkpoint in {out / 'checkpoints'}: " + "; ".join(start.notes) + "; nothing was changed"
            )
        start.notes = [n + f"; resuming from {start.resume} instead" for n in start.notes]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint folder; omit it to resume the latest")
        if is_finished(out, path, max_steps):
            start.resume, start.finished = str(path), True
            return start
        problem = verify(path, world_size, replay)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable ({problem}); {_advice(path)}")
        start.resume = str(path)
    step = json.loads((Path(start.resume) / STATE).read_text())["step"]
    if step > max_steps:
        raise CheckpointError(
            f"checkpoint {start.resume} is at step {step}, beyond train.max_steps={max_steps}; "
            f"raise train.max_steps (it may change on resume) or resume an earlier checkpoint"
        )
    return start


def is_finished(out: Path, checkpoint: Path, max_steps: int) -> bool:
    """True when ``checkpoint`` is at the run's last step and the run was exported (``OUTPUT/final``).

    A run killed between its last checkpoint and the export is not finished: resuming it
    evaluates and exports without training (from a verified checkpoint only).
    """
    try:
        step = json.loads((checkpoint / STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(step, int) and step >= max_steps and (out / "final").is_dir()


def write_run_config(out: Path, cfg: RunConfig) -> None:
    """The run's resolved config: written by a fresh run, rewritten when a resume changed settings."""
    write_atomic(out / "run_config.yaml", dump_yaml(cfg))


# ====================================================================== integrity
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir())
    entries = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in files}
    _write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "files": entries})


def _foreign(names: list[str]) -> list[str]:
    return [n for n in names if n != MANIFEST and not CHECKPOINT_FILE.fullmatch(n)]


def verify(path: Path, world_size: int, replay: bool) -> str | None:
    """What is wrong with checkpoint ``path`` (None: intact and usable by ``world_size`` processes).

    Reads every file once for its SHA-256 and the safetensors files once more for finiteness;
    never unpickles anything (no file the trainer does not write is accepted, whatever its name).
    """
    names = sorted(p.name for p in path.iterdir())
    foreign = _foreign(names)
    if foreign:
        return f"it holds {', '.join(foreign)}, which the trainer never writes (checkpoints hold no .pkl or .bin files)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            return f"{MANIFEST} is not a manifest of format {MANIFEST_FORMAT}"
    except FileNotFoundError:
        return f"it has no {MANIFEST} (incomplete, or written by an older version of the trainer)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    foreign = _foreign(list(listed))
    if foreign:
        return f"its manifest lists {', '.join(foreign)}, which the trainer never writes"
    unlisted = sorted(set(names) - set(listed) - {MANIFEST})
    if unlisted:
        return f"{', '.join(unlisted)} not in its manifest"
    if STATE not in listed:
        return f"it lacks {STATE}"
    for name, entry in sorted(listed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"its manifest entry of {name} is malformed"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {size}"
        if sha256(file) != digest:
            return f"{name}: SHA-256 differs from its manifest (the file was changed or damaged)"
    try:
        state = json.loads((path / STATE).read_text())
        if not all(isinstance(state.get(k), int) for k in ("step", "tokens_seen", "world_size")):
            raise ValueError
    except (ValueError, AttributeError):
        return f"{STATE} is malformed"
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {state['world_size']} processes; resume it with the same "
            f"number ({world_size} now: per-process RNG and replay buffers are part of an exact resume)"
        )
    needed = ["model.safetensors", "optimizer.safetensors", "optimizer.json"]
    for rank in range(world_size):
        needed += [f"process_{rank}.json", f"process_{rank}.safetensors"] + ([f"replay_{rank}.safetensors"] if replay else [])
    missing = [n for n in needed if n not in listed]
    if missing:
        return f"it lacks {', '.join(missing)}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        bad = _first_non_finite(path / name)
        if bad:
            return bad
    return None


def _first_non_finite(file: Path) -> str | None:
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"{file.name}: {key} holds non-finite values"
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return f"{file.name} is unreadable ({type(e).__name__}: {e})"
    return None


# ====================================================================== saving
def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: JSON scalars and tensors (torch CPU, CUDA, numpy, python ``random``)."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "rng.python.state": torch.tensor(internal, dtype=torch.int64),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(cuda)})
    scalars = {
        "python": {"version": version, "gauss_next": gauss_next},
        "numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cuda_devices": len(cuda),
    }
    return scalars, tensors


def _set_rng_state(scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = scalars["python"]
    random.setstate((py["version"], tuple(int(v) for v in tensors["rng.python.state"].tolist()), py["gauss_next"]))
    npy = scalars["numpy"]
    keys = tensors["rng.numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(scalars["cuda_devices"])]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_files(sd: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimiser's (full) state dict as (JSON, tensors): each tensor ``state.<param index>.<name>``."""
    tensors, other = {}, {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(idx), {})[name] = value
    return {"param_groups": sd["param_groups"], "state": other}, tensors


def save(
    accelerator: Any,
    root: Path,
    step: int,
    state: dict,
    process_state: dict,
    model: torch.nn.Module | dict[str, torch.Tensor],
    optimizer_state: dict | None,
    replay: ReplayBuffer | None,
    keep_last: int,
) -> Path:
    """Save everything needed to continue exactly (all processes call this).

    ``model``: the unwrapped model, or its full weights (gathered from the shards); ``optimizer_state``:
    the full optimiser state dict in ``torch.optim`` form, needed on the main process only."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # full weights and optimiser state, gathered beforehand when sharded
        if isinstance(model, dict):
            save_file({k: v.contiguous().cpu() for k, v in model.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
        else:
            save_model(model, str(tmp / "model.safetensors"))
        meta, tensors = _optimizer_files(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    rng_scalars, rng_tensors = _rng_state()
    _write_json(tmp / f"process_{rank}.json", dict(process_state, rng=rng_scalars))
    save_file({k: v.contiguous().cpu() for k, v in rng_tensors.items()}, str(tmp / f"process_{rank}.safetensors"))
    if replay is not None:
        replay.save(tmp / f"replay_{rank}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE, dict(state, world_size=accelerator.num_processes))
        write_manifest(tmp)  # last: a checkpoint whose files all match it is complete
        if final.exists():  # the same step saved before (a crash after it, or a damaged copy): replaced
            shutil.rmtree(final)
        tmp.rename(final)
        rotate(root, step, keep_last)
    accelerator.wait_for_everyone()
    return final


def rotate(root: Path, step: int, keep_last: int) -> None:
    """Keep the last ``keep_last`` checkpoints up to ``step``; later ones are from a trajectory the run
    abandoned when it resumed an earlier checkpoint (e.g. past a damaged one), so they go too."""
    ckpts = checkpoints(root)
    number = {p: int(p.name[len(PREFIX) :]) for p in ckpts}
    upto = [p for p in ckpts if number[p] <= step]
    for old in upto[:-keep_last] + [p for p in ckpts if number[p] > step]:
        shutil.rmtree(old)
    for leftover in root.glob(f"{PREFIX}*.tmp"):  # other steps' partial saves of a crashed run
        shutil.rmtree(leftover, ignore_errors=True)


# ====================================================================== loading
def _check_shapes(path: Path, model: torch.nn.Module) -> None:
    """A checkpoint of another model is refused with one line naming the first differing tensor."""
    here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        there = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    differ = [k for k in here if k in there and here[k] != there[k]]  # in the model's order
    unknown = [k for k in there if k not in here]
    if differ or unknown:
        first = (
            f"{differ[0]} is {there[differ[0]]} there and {here[differ[0]]} here"
            if differ
            else f"it has {unknown[0]}, which this model lacks"
        )
        more = len(differ) + len(unknown) - 1
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's model: {first}"
            + (f" ({more} more tensor(s) differ)" if more else "")
            + "; resume it with the model and tokenizer settings it was written with (its run's run_config.yaml)"
        )


@dataclass
class OptimizerIO:
    """How :func:`load` restores an optimiser whatever its sharding (``train/sharding.py``)."""

    shapes: list[tuple[int, ...]]  # full shape of each parameter, in the optimiser's order
    groups: list[dict]  # this run's param groups: hyper-parameters and "size" (number of parameters)
    load: Callable[[dict], None]  # loads a full state dict in torch.optim form (each process keeps its share)
    non_finite: Callable[[], str | None]  # the first non-finite weight or optimiser value of this process


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's full weights into the (not yet wrapped) model, on every process."""
    foreign = _foreign([p.name for p in path.iterdir()])
    if foreign:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(foreign)}, which the trainer never writes; {_advice(path)}")
    try:
        _check_shapes(path, model)
        load_model(model, str(path / "model.safetensors"), strict=True)  # read on the CPU, copied into the parameters
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); {_advice(path)}") from None


def load(accelerator: Any, path: Path, optimizer: OptimizerIO, replay: ReplayBuffer | None) -> tuple[dict, dict]:
    """Restore optimiser state, this process's RNG and replay buffer from a verified checkpoint whose
    weights :func:`load_weights` loaded.

    Returns (trainer state, process state). The optimiser keeps its current param groups (the
    run's config: learning rates and the like may change on resume); only per-parameter state
    is loaded, and checked against the parameters' shapes.
    """
    rank = accelerator.process_index
    try:
        state = json.loads((path / STATE).read_text())
        process_state = json.loads((path / f"process_{rank}.json").read_text())
        meta = json.loads((path / "optimizer.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        loaded: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, idx, name = key.split(".", 2)
            loaded.setdefault(int(idx), {})[name] = value
        for idx, entries in meta["state"].items():
            loaded.setdefault(int(idx), {}).update(entries)
        saved_sizes = [len(g["params"]) for g in meta["param_groups"]]
        sizes_now = [g["size"] for g in optimizer.groups]
        if saved_sizes != sizes_now or set(loaded) - set(range(len(optimizer.shapes))):
            raise CheckpointError(
                f"checkpoint {path}: its optimiser has parameter groups of sizes {saved_sizes}, this run's "
                f"{sizes_now}; resume it with the settings it was written with"
            )
        for idx, entries in loaded.items():
            for name, t in entries.items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != optimizer.shapes[idx]:
                    raise CheckpointError(f"checkpoint {path}: optimiser state {idx}.{name} does not fit its parameter")
        # The run's own hyper-parameters (resumable changes apply), the saved per-parameter state.
        groups, first = [], 0
        for group in optimizer.groups:
            hyper = {k: v for k, v in group.items() if k != "size"}
            groups.append(dict(hyper, params=list(range(first, first + group["size"]))))
            first += group["size"]
        optimizer.load({"state": loaded, "param_groups": groups})
        if replay is not None:
            replay.load(path / f"replay_{rank}.safetensors", accelerator.device)
        bad = optimizer.non_finite()
        if bad:
            raise CheckpointError(f"checkpoint {path} holds non-finite values ({bad}); {_advice(path)}")
        _set_rng_state(process_state.pop("rng"), load_file(str(path / f"process_{rank}.safetensors")))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/torch/json raise many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); {_advice(path)}") from None
    return state, process_state


def non_finite(model: torch.nn.Module, optimizer_state: dict | None = None) -> str | None:
    """The name of the first non-finite parameter (or optimiser state tensor: ``optimizer_state`` maps
    parameters to their state), or None. Sees this process's shards only."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            return f"parameter {name}"
    if optimizer_state is not None:
        for idx, entries in enumerate(optimizer_state.values()):
            for key, t in entries.items():
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"optimiser state {idx}.{key}"
    return None


def finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-dim float tensor (CPU): how many of ``tensors`` hold a NaN or an infinity.

    One fused max-abs per device (``torch._foreach_norm`` with ord=inf: NaN propagates, and unlike
    the 2-norm it cannot overflow on large finite weights); optimiser step counts may sit on the
    CPU beside weights on a GPU, hence the grouping.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():  # an empty shard (FSDP) has no maximum
            by_device.setdefault(t.device, []).append(t.detach())
    bad = torch.zeros(())
    for group in by_device.values():
        maxes = torch._foreach_norm(group, math.inf)
        bad += (~torch.isfinite(torch.stack(maxes))).sum().float().cpu()
    return bad


def _advice(path: Path) -> str:
    return (
        f"resume an older one with checkpoint.resume=PATH (see {path.parent}), or move this one away; nothing was overwritten"
    )
