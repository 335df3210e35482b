"""From the ``data``/``tokenizer`` config sections to batches: tokenizer, packed blocks, batch order.

Batch order is a pure function of (seed, step) for in-memory data: global batch ``step`` is a
slice of a seeded per-epoch permutation, and process ``rank`` takes micro-batch ``m``'s rows
``[(m * world + rank) * mb, ... + mb)`` of it. So the data position is just the step number, a
resumed run sees exactly the same batches, and N processes see the same global batch as one.
Streamed data keeps its position as ``datasets``' own ``state_dict`` per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ebt import data as D
from ebt import tokenizer as T
from train.config import DataConfig, TokenizerConfig

AUTO_NUM_PROC_ROWS = 200_000  # below this, worker start-up costs more than it saves


def _columns(cfg: DataConfig) -> dict:
    if cfg.source == "tasks":
        return {"prompt_column": "prompt", "answer_column": "answer"}
    if cfg.prompt_column:
        return {"prompt_column": cfg.prompt_column, "answer_column": cfg.answer_column}
    return {"text_column": cfg.text_column}


def raw_split(cfg: DataConfig, split: str, seed: int) -> D.Source:
    """One split of the configured source, before tokenisation."""
    if cfg.source == "tasks":
        n = cfg.task_examples if split == "train" else cfg.task_val_examples
        return D.task_mixture(list(cfg.tasks), "train" if split == "train" else "validation", n, seed)
    name = cfg.train_split if split == "train" else cfg.val_split
    return D.load_source(
        cfg.source, fmt=cfg.format, hub_config=cfg.hub_config, split=name, streaming=cfg.streaming, sample_by=cfg.sample_by
    )


def build_tokenizer(cfg: TokenizerConfig, raw_train: D.Source, data_cfg: DataConfig) -> PreTrainedTokenizerBase:
    """A new tokenizer for this run (char / SentencePiece trained on the training text, or an existing one)."""
    if cfg.kind == "pretrained":
        return T.pretrained_tokenizer(cfg.name_or_path)
    cols = _columns(data_cfg)
    names = [cols["prompt_column"], cols["answer_column"]] if "prompt_column" in cols else [cols["text_column"]]
    texts = T.take_chars(D.iter_texts(raw_train, names), cfg.train_chars)
    if cfg.kind == "char":
        return T.char_tokenizer(texts, eos_token=cfg.eos_token)
    return T.sentencepiece_tokenizer(texts, cfg.vocab_size, cfg.model_type, eos_token=cfg.eos_token)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"the run's tokenizer in {path} is unreadable ({e}); start a new output_dir") from None


def _num_proc(cfg: DataConfig, ds: D.Source) -> int | None:
    if cfg.num_proc is not None or not isinstance(ds, datasets.Dataset):
        return cfg.num_proc
    return min(os.cpu_count() or 1, 8) if len(ds) >= AUTO_NUM_PROC_ROWS else None


def blocks(cfg: DataConfig, ds: D.Source, tokenizer: PreTrainedTokenizerBase) -> D.Source:
    """Tokenise (cached by ``datasets`` for file/Hub sources) and pack into ``block_size`` blocks."""
    n = _num_proc(cfg, ds)
    tokens = D.tokenize(ds, tokenizer, num_proc=n, **_columns(cfg))
    return D.pack(tokens, cfg.block_size, num_proc=n)


@dataclass
class Blocks:
    train: D.Source
    val: datasets.Dataset


def build_blocks(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, raw_train: D.Source, seed: int) -> Blocks:
    """Training blocks and a fixed validation set (own split if the source has one, else held out)."""
    train = blocks(cfg, raw_train, tokenizer)
    if cfg.val_split is not None or cfg.source == "tasks":
        val = blocks(cfg, raw_split(cfg, "val", seed), tokenizer)
    elif cfg.streaming:
        val, train = train.take(cfg.val_blocks), train.skip(cfg.val_blocks)
    else:
        if len(train) == 0:
            raise ValueError(_too_little(cfg))
        train, val = D.tail_split(train, cfg.val_fraction)
    if isinstance(val, datasets.IterableDataset):
        val = datasets.Dataset.from_list(list(val))
    if len(val) == 0 or (isinstance(train, datasets.Dataset) and len(train) == 0):
        raise ValueError(_too_little(cfg))
    return Blocks(train=train, val=val.with_format("torch"))


def _too_little(cfg: DataConfig) -> str:
    return (
        f"data.source={cfg.source!r} gives no complete block of data.block_size={cfg.block_size} tokens "
        f"for training or validation: the text is empty or too short; add text or lower data.block_size"
    )


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
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}

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
