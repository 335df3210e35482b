"""Replay buffer of the S2 recipe: past final candidates re-used as starting points.

Rows are stored with the context they were refined for (``input_ids``, ``labels``), because a
candidate is only a meaningful start for its own sequence. Each process keeps its own buffer
(no communication); it is saved with every checkpoint as tensors only, so it loads with
``weights_only=True`` semantics (safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ReplayBuffer:
    """A ring of at most ``capacity`` rows; sampling uses the (checkpointed) torch RNG."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.input_ids: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.next = 0  # ring position of the next write

    def __len__(self) -> int:
        return 0 if self.input_ids is None else len(self.input_ids)

    def add(self, input_ids: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """Store rows (oldest overwritten first); ``logits`` must already be detached."""
        n = min(len(input_ids), self.capacity)
        new = {"input_ids": input_ids[-n:], "labels": labels[-n:], "logits": logits[-n:]}
        if len(self) < self.capacity:  # still filling: append and keep the newest rows
            for name, rows in new.items():
                old = getattr(self, name)
                setattr(self, name, (rows if old is None else torch.cat([old, rows]))[-self.capacity :])
            return
        idx = (torch.arange(n, device=input_ids.device) + self.next) % self.capacity
        for name, rows in new.items():
            getattr(self, name)[idx] = rows
        self.next = (self.next + n) % self.capacity

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``n`` random stored rows (input_ids, labels, logits), or None while fewer are stored."""
        if n < 1 or len(self) < n:
            return None
        idx = torch.randperm(len(self))[:n].to(self.input_ids.device)
        return self.input_ids[idx], self.labels[idx], self.logits[idx]

    def save(self, path: Path) -> None:
        tensors = {"next": torch.tensor(self.next)}
        if len(self):
            tensors.update(input_ids=self.input_ids, labels=self.labels, logits=self.logits)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))

    def load(self, path: Path, device: torch.device) -> None:
        tensors = load_file(str(path), device=str(device))
        self.next = int(tensors.pop("next"))
        self.input_ids = tensors.get("input_ids")
        self.labels = tensors.get("labels")
        self.logits = tensors.get("logits")
