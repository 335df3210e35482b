"""Packed blocks -> this process's micro-batches, in an order that survives restarts and process counts.

Batch order is a pure function of (seed, step) for in-memory data: global batch ``step`` is a
slice of a seeded per-epoch permutation, and process ``rank`` takes micro-batch ``m``'s rows
``[(m * world + rank) * mb, ... + mb)`` of it. So the data position is just the step number, a
resumed run sees exactly the same batches, and N processes see the same global batch as one.
Streamed data keeps its position as ``datasets``' own ``state_dict`` per process. The blocks
themselves come from ``train/data.py``.
"""

from __future__ import annotations

import datasets
import torch
from datasets.distributed import split_dataset_by_node


class Batches:
    """Seeded, step-addressed batches over in-memory blocks (see the module docstring)."""

    def __init__(self, train: datasets.Dataset, global_batch: int, seed: int):
        if len(train) < global_batch:
            raise ValueError(
                f"{len(train)} training blocks is fewer than one global batch ({global_batch}); "
                f"lower train.micro_batch_size / train.grad_accum_steps or add data"
            )
        self.train = train.with_format("torch")
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(train) // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.train), generator=gen))
        return self._perm[1]

    def micro(self, step: int, first: int, size: int) -> dict[str, torch.Tensor]:
        """Rows ``first .. first + size`` of global batch ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        rows = self._permutation(epoch)[k * self.global_batch + first :][:size]
        return self.train[rows.tolist()]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StreamBatches:
    """This process's share of a streamed corpus; position = ``datasets``' iterator state."""

    def __init__(self, train: datasets.IterableDataset, rank: int, world: int, seed: int, shuffle_buffer: int):
        ds = split_dataset_by_node(train, rank=rank, world_size=world)
        self.ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds
        self.epoch = 0
        self._it = None

    def _next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self.ds.set_epoch(self.epoch)
                self._it = iter(self.ds)
            row = next(self._it, None)
            if row is not None:
                return row
            self.epoch, self._it = self.epoch + 1, None
        raise ValueError("the streamed training data yields no blocks; check data.source and data.block_size")

    def micro(self, step: int, first: int, size: int) -> dict[str, torch.Tensor]:
        rows = [self._next() for _ in range(size)]
        keys = [k for k in ("input_ids", "labels", "attention_mask") if k in rows[0]]  # a mask: data.answer_block rows
        return {k: torch.tensor([r[k] for r in rows]) for k in keys}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stream": self.ds.state_dict() if self._it is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        if state["stream"] is not None:
            self.ds.set_epoch(self.epoch)
            self.ds.load_state_dict(state["stream"])
            self._it = iter(self.ds)


def val_rows(val: datasets.Dataset, max_blocks: int, rank: int, world: int, size: int) -> list[dict[str, torch.Tensor]]:
    """This process's validation micro-batches: every ``world``-th of the first ``max_blocks`` blocks."""
    idx = list(range(min(max_blocks, len(val))))[rank::world]
    return [val[idx[i : i + size]] for i in range(0, len(idx), size)]


def training_batches(
    train: datasets.Dataset | datasets.IterableDataset,
    global_batch: int,
    rank: int,
    world: int,
    seed: int,
    shuffle_buffer: int,
) -> Batches | StreamBatches:
    """Step-addressed batches over in-memory blocks, or this process's share of a stream."""
    if isinstance(train, datasets.Dataset):
        return Batches(train, global_batch, seed)
    return StreamBatches(train, rank, world, seed, shuffle_buffer)
