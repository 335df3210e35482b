"""Sharded training (``train.sharding``), applied by the trainer itself so that one code path runs on CPU and GPU.

Accelerate starts the processes, picks the device and the mixed precision; the trainer then
wraps the model and builds the optimiser for the chosen mode:

- ``none``: DDP through ``Accelerator.prepare`` (full parameters, gradients and AdamW state on
  every process).
- ``zero``: DDP plus ``torch.distributed.optim.ZeroRedundancyOptimizer``: each process keeps
  the AdamW state of its share of the parameters only and broadcasts its updated share after
  the step (ZeRO stage 1). Gradients are all-reduced by DDP exactly as with ``none``.
- ``fsdp_full`` / ``fsdp_grad_op``: FSDP1 (``FullyShardedDataParallel``, ``FULL_SHARD`` /
  ``SHARD_GRAD_OP``, ``use_orig_params=True``) with the whole model as ONE unit (root wrapping).
  Parameters (``fsdp_full`` only), gradients and AdamW state are sharded at rest; during each
  step the full parameters are gathered (one unit), so the peak holds them anyway.

Why root wrapping only: the EBT's candidate stream re-uses the layers' weights inside the
forward outside those layers' ``__call__`` (stacked q/k/v weights, repeated inner steps), so
per-layer FSDP units (an auto-wrap policy) would run on sharded weights: their unshard hooks
never fire (measured: "size mismatch" errors). FSDP2 (``fully_shard``) breaks double backward
(pytorch#172543). Both stay refused.

Every mode writes the same checkpoint format (``train/checkpoint.py``): the full model weights
and the full AdamW state indexed by the parameter's position in the optimiser's groups, so a
run may even resume under another mode. Accelerate's own FSDP and DeepSpeed plugins are refused
(``train/loop.py``): on CPU they silently fall back to DDP, so nothing of theirs could be tested.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

MODES = ("none", "zero", "fsdp_full", "fsdp_grad_op")


class Sharding:
    """One mode's wrapping, gathering and checkpoint conversion (every method is called by all processes)."""

    def __init__(self, mode: str, accelerator: Any):
        if mode not in MODES:
            raise ValueError(f"train.sharding={mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.acc = mode, accelerator
        self.fsdp = mode.startswith("fsdp")
        self.module: torch.nn.Module | None = None  # the unwrapped model

    # ------------------------------------------------------------------ wrapping
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, Any]:
        """Wrap ``model``; ``optimizer`` (AdamW over ``model``'s own parameters, built before the wrapping and
        not yet stepped) is kept, or re-built as a ZeroRedundancyOptimizer with the same groups."""
        acc = self.acc
        self.module = model
        groups = optimizer.param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names[id(p)] for g in groups for p in g["params"]]  # optimiser order
        self.shapes = [tuple(p.shape) for g in groups for p in g["params"]]  # full shapes, before any sharding
        if self.mode == "none" or acc.num_processes == 1:
            return acc.prepare(model, optimizer)
        if self.mode == "zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            wrapped = acc.prepare(model)  # DDP, device, autocast: as for "none"
            first, *rest = groups
            accepted = inspect.signature(type(optimizer)).parameters  # the group keys its constructor takes
            defaults = {k: v for k, v in _hyper(first).items() if k in accepted}
            zero = ZeroRedundancyOptimizer(first["params"], optimizer_class=type(optimizer), **defaults)
            for group in rest:
                zero.add_param_group(dict(group))
            return wrapped, zero
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        strategy = {"fsdp_full": ShardingStrategy.FULL_SHARD, "fsdp_grad_op": ShardingStrategy.SHARD_GRAD_OP}[self.mode]
        device = torch.device("cpu") if acc.device.type == "cpu" else acc.device  # FSDP refuses "cpu:0"
        model.to(device)
        wrapped = FSDP(model, sharding_strategy=strategy, use_orig_params=True, device_id=device, auto_wrap_policy=None)
        # use_orig_params keeps the very Parameter objects (now views of the local shard), so the optimiser
        # built on the unwrapped model holds them; its state is created at the first step, shard-sized.
        return wrapped, optimizer

    @property
    def sharded(self) -> bool:
        return self.mode != "none" and self.acc.num_processes > 1

    @property
    def own_autocast(self) -> bool:
        """FSDP models are not prepared by Accelerate: the trainer applies its autocast itself."""
        return self.fsdp and self.sharded

    def no_sync(self, model: torch.nn.Module, last: bool):
        """Gradient sync skipped on all but the last micro-batch (DDP); FSDP reduce-scatters every one
        (its no_sync would keep unsharded gradients, which is what sharding is meant to avoid)."""
        if last or (self.fsdp and self.sharded):
            return nullcontext()
        return self.acc.no_sync(model)

    def clip_grad_norm(self, model: torch.nn.Module, clip: float) -> float:
        """The global gradient norm (before clipping) over all shards; clips to ``clip``."""
        if self.fsdp and self.sharded:
            return float(model.clip_grad_norm_(clip))
        return float(self.acc.clip_grad_norm_(model.parameters(), clip))

    def full_parameters(self, model: torch.nn.Module):
        """A context in which the unwrapped model holds its full parameters (read-only): for metrics of them."""
        if self.fsdp and self.sharded:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.summon_full_params(model, writeback=False)
        return nullcontext()

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """What validation calls: the FSDP root (it gathers the parameters), else the unwrapped model."""
        return model if self.fsdp and self.sharded else self.module

    # ------------------------------------------------------------------ state
    def local_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This process's optimiser state (param -> {name: value}): its shard under ZeRO and FSDP."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
        return getattr(inner, "optim", inner).state  # ZeroRedundancyOptimizer keeps its shard in .optim

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full weights (collective under FSDP); None: save the unwrapped model itself."""
        if not (self.fsdp and self.sharded):
            return None
        with _full_state_dicts(model):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The full optimiser state in ``torch.optim`` form (state and groups by optimiser index) on the
        main process (None elsewhere); a collective call."""
        if self.mode == "zero" and self.sharded:
            optimizer.consolidate_state_dict(to=0)
            return optimizer.state_dict() if self.acc.is_main_process else None
        if self.fsdp and self.sharded:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with _full_state_dicts(model):
                osd = FSDP.optim_state_dict(model, optimizer)
            index = {n: i for i, n in enumerate(self.names)}
            groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]]
            return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}
        return optimizer.state_dict()

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        """Load the full state ``sd`` (``torch.optim`` form) on every process; each keeps its own share."""
        if self.fsdp and self.sharded:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            names = dict(enumerate(self.names))
            groups, k = [], 0
            for g in sd["param_groups"]:
                groups.append(dict(g, params=[names[k + j] for j in range(len(g["params"]))]))
                k += len(g["params"])
            osd = {"state": {names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}
            with _full_state_dicts(model):
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, osd))
            return
        optimizer.load_state_dict(sd)  # ZeroRedundancyOptimizer keeps the state of its own partition


@contextmanager
def _full_state_dicts(model: torch.nn.Module):
    """FSDP's full (gathered) model and optimiser state dicts, on every process: offload_to_cpu=True
    segfaults on CPU processes (gloo), and rank0_only needs it."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the FSDP1 state-dict API is deprecated, not removed
        with FSDP.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(False, False), FullOptimStateDictConfig(False, False)
        ):
            yield


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def memory_at_rest(model: torch.nn.Module, optimizer_state: dict) -> dict[str, int]:
    """Bytes this process holds in parameters, gradients and optimiser state (local tensors, unique storage)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    flat = [h.flat_param for h in _fsdp_handles(model)]
    # FSDP: the flat parameter, its local shard and its gathered buffer (when still allocated).
    held = [t for f in flat for t in (f, getattr(f, "_local_shard", None), getattr(f, "_full_param_padded", None))]
    return {
        "parameters": size(held or params),
        "gradients": size([getattr(f, "grad", None) for f in flat] if flat else [p.grad for p in params]),
        "optimizer": size([v for s in optimizer_state.values() for v in s.values()]),
    }


def _fsdp_handles(model: torch.nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return []
    return [m._handle for m in model.modules() if isinstance(m, FSDP) and m._handle is not None]
