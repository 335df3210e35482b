"""Replay buffer: rows of past batches re-used in later ones (the EBT's S2 recipe replays its
final candidates as starting points).

The model says what a row is (``replay_rows(batch, output)``: named tensors, the first dimension
the row); the buffer keeps them together, because e.g. a candidate is only a meaningful start
for its own sequence, and the trainer appends sampled rows to a batch by name. Each process
keeps its own buffer (no communication); it is saved with every checkpoint as tensors only
(safetensors), so loading it runs no code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "rows."  # safetensors key of a stored column; "next" is the ring position


class ReplayBuffer:
    """A ring of at most ``capacity`` rows of named tensors; sampling uses the (checkpointed) torch RNG."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: dict[str, torch.Tensor] = {}
        self.next = 0  # ring position of the next write

    def __len__(self) -> int:
        return len(next(iter(self.rows.values()))) if self.rows else 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Store rows (oldest overwritten first); every tensor must already be detached."""
        sizes = {name: len(t) for name, t in rows.items()}
        if not rows or len(set(sizes.values())) != 1:
            raise ValueError(f"replay rows must be named tensors with one row count, got {sizes}")
        if self.rows and set(rows) != set(self.rows):
            raise ValueError(f"replay rows named {sorted(rows)}; the buffer holds {sorted(self.rows)}")
        n = min(next(iter(sizes.values())), self.capacity)
        new = {name: t[-n:] for name, t in rows.items()}
        if len(self) < self.capacity:  # still filling: append and keep the newest rows
            for name, t in new.items():
                old = self.rows.get(name)
                self.rows[name] = (t if old is None else torch.cat([old, t]))[-self.capacity :]
            return
        idx = (torch.arange(n, device=self.device) + self.next) % self.capacity
        for name, t in new.items():
            self.rows[name][idx] = t
        self.next = (self.next + n) % self.capacity

    @property
    def device(self) -> torch.device:
        return next(iter(self.rows.values())).device

    def sample(self, n: int) -> dict[str, torch.Tensor] | None:
        """``n`` random stored rows, or None while fewer are stored."""
        if n < 1 or len(self) < n:
            return None
        idx = torch.randperm(len(self))[:n].to(self.device)
        return {name: t[idx] for name, t in self.rows.items()}

    def save(self, path: Path) -> None:
        tensors = {"next": torch.tensor(self.next), **{PREFIX + name: t for name, t in self.rows.items()}}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))

    def load(self, path: Path, device: torch.device) -> None:
        tensors = {k: v.to(device) for k, v in load_file(str(path)).items()}  # "cpu:0" is no safetensors device
        self.next = int(tensors.pop("next"))
        self.rows = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
