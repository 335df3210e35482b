"""The training loop on Accelerate, shared by the EBT and its Transformer++ twin.

Same data, tokenizer, schedule and tokens seen for both kinds, so their curves compare.
Design points (each is tested):

- The loss of a global batch is the token-weighted mean over all its scored tokens, whatever
  the number of processes and micro-batches: each micro-batch's mean loss is weighted by its
  share of the batch's scored tokens (counted with one all-reduce). With DDP's gradient
  averaging this makes N processes compute the same gradients as one.
- EBT starting candidates are seeded per (seed, step, row of the global batch), so they too do
  not depend on the process count; replayed rows (S2) come from a per-process buffer.
- Non-finite policy: a step whose loss or gradient norm is not finite is skipped (no update,
  logged); ``train.max_nonfinite_steps`` consecutive ones stop the run with
  :class:`NonFiniteLoss` before anything is saved, so the last good checkpoint survives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from train import checkpoint as C
from train import inputs as I
from train.config import ModelConfig, RunConfig, TrainConfig, flat, to_dict
from train.export import export
from train.replay import ReplayBuffer

IGNORE = -100
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite steps; the run stopped without saving."""


def make_accelerator(cfg: RunConfig) -> Accelerator:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    mp = "no" if mp == "fp32" else mp  # Accelerate's name
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    # Second-order training: a parameter may get no gradient in a step (e.g. the step
    # embedding of an unused step count); without find_unused_parameters DDP then leaves the
    # first step's gradients un-averaged, silently.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.kind == "ebt")
    # cpu=True on GPU-less machines: without it Accelerate leaves torchrun's processes ungrouped
    # (each trains alone on the full batch) instead of joining them with gloo.
    acc = Accelerator(
        mixed_precision=mp,
        cpu=not torch.cuda.is_available(),
        log_with=log_with,
        project_dir=cfg.output_dir,
        kwargs_handlers=[ddp],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != launched:
        raise ValueError(f"{launched} processes were launched but {acc.num_processes} joined the process group")
    if acc.distributed_type not in SUPPORTED:
        raise ValueError(
            f"distributed type {acc.distributed_type.value} is not supported: the EBT's second-order "
            f"gradients are only verified under DDP (FSDP2 with create_graph=True errors or returns no "
            f"gradients, pytorch#172543). Launch with a DDP config, e.g. "
            f"accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m train ..."
        )
    return acc


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """An EBT, or its Llama twin built from the very same EBTConfig (hence the same shape)."""
    from ebt import EBTConfig, EBTForCausalLM, llama_twin_config

    sizes = {f: getattr(cfg, f) for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")}
    valid = {f.name for f in dataclasses.fields(EBTConfig)} - set(sizes) - {"vocab_size"}
    unknown = sorted(set(cfg.ebt) - valid)
    if unknown:
        raise ValueError(f"model.ebt has unknown key(s) {unknown}; valid: {', '.join(sorted(valid))}")
    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    config = EBTConfig(**sizes, **ids, **cfg.ebt)
    return LlamaForCausalLM(llama_twin_config(config)) if cfg.kind == "llama" else EBTForCausalLM(config)


def build_optimizer(model: PreTrainedModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: matrices decay; norms don't; the EBT's alpha has its own lr multiplier and no decay."""
    groups = {"decay": [], "no_decay": [], "alpha": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["alpha" if name == "alpha" else "decay" if p.ndim >= 2 else "no_decay"].append(p)
    alpha_mult = getattr(model.config, "step_size_lr_multiplier", 1.0)
    spec = [
        {"params": groups["decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": groups["alpha"], "lr": cfg.lr * alpha_mult, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in spec if g["params"]], betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to ``min_lr_ratio``; a factor, so each group keeps its own floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def row_noise(seed: int, step: int, rows: range, shape: tuple[int, int], scale: float, device: torch.device) -> torch.Tensor:
    """EBT starting candidates keyed on (seed, step, global row): independent of process count."""
    out = torch.empty(len(rows), *shape, device=device)
    for i, row in enumerate(rows):
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_000_003 + row)
        out[i] = torch.randn(shape, generator=gen, device=device)
    return out * scale


def scored(labels: torch.Tensor) -> int:
    """Tokens that get a loss: labels are shifted inside the model, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE).sum())


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.acc = make_accelerator(cfg)
        self.resume_from = C.prepare_output(self.out, cfg)  # fails before anything is written
        created = not self.out.exists()
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            C.write_run_config(self.out, cfg)
        try:
            self._setup()
        except Exception:
            if self.acc.is_main_process and self.resume_from is None:  # bad data or model: leave no half-made run
                C.discard_fresh_run(self.out, created)
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.train.seed)
        self.tokenizer, self.blocks = self._data()
        self.model = build_model(cfg.model, self.tokenizer)
        set_seed(cfg.train.seed + self.acc.process_index)  # the EBT's own draws differ per process
        self.is_ebt = cfg.model.kind == "ebt"
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.train))
        # The scheduler is stepped by hand: Accelerate's wrapper would step it once per process.
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.replay = ReplayBuffer(cfg.train.replay_buffer_size) if cfg.train.replay_buffer_size else None
        world, t = self.acc.num_processes, cfg.train
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * world
        if isinstance(self.blocks.train, datasets.Dataset):
            self.batches = I.Batches(self.blocks.train, self.global_batch, t.seed)
        else:
            self.batches = I.StreamBatches(self.blocks.train, self.acc.process_index, world, t.seed, cfg.data.shuffle_buffer)
        self.val = I.val_rows(self.blocks.val, cfg.eval.max_blocks, self.acc.process_index, world, t.micro_batch_size)
        self.step, self.tokens_seen, self.bad_steps = 0, 0, 0

    # ------------------------------------------------------------------ setup
    def _data(self) -> tuple[PreTrainedTokenizerBase, I.Blocks]:
        cfg, acc = self.cfg, self.acc
        tok_dir = self.out / "tokenizer"
        with acc.main_process_first():  # main builds tokenizer and data caches, the others re-use them
            raw = I.raw_split(cfg.data, "train", cfg.train.seed)
            if tok_dir.is_dir():
                tokenizer = I.load_tokenizer(tok_dir)
            else:
                tokenizer = I.build_tokenizer(cfg.tokenizer, raw, cfg.data)
                if acc.is_main_process:
                    tokenizer.save_pretrained(str(tok_dir))
            blocks = I.build_blocks(cfg.data, tokenizer, raw, cfg.train.seed)
        return tokenizer, blocks

    def _resume(self) -> None:
        state, process_state = C.load(self.acc, self.resume_from, self.replay)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.batches.load_state_dict(process_state["data"])
        if self.acc.is_main_process:  # drop what the interrupted run logged after this checkpoint
            lines = self._metrics_path().read_text().splitlines() if self._metrics_path().exists() else []
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            self._metrics_path().write_text("".join(ln + "\n" for ln in kept))
        self.acc.print(f"resumed from {self.resume_from} at step {self.step}")

    # ------------------------------------------------------------------ one step
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the current global batch, EBT starting points included."""
        t, rank, world = self.cfg.train, self.acc.process_index, self.acc.num_processes
        mbs = []
        for m in range(t.grad_accum_steps):
            first = (m * world + rank) * t.micro_batch_size
            mb = {k: v.to(self.acc.device) for k, v in self.batches.micro(self.step, first, t.micro_batch_size).items()}
            if self.is_ebt:
                rows = range(first, first + t.micro_batch_size)
                cfg = self.acc.unwrap_model(self.model).config
                shape = (mb["input_ids"].shape[1], cfg.vocab_size)
                mb["init_logits"] = row_noise(t.seed, self.step, rows, shape, cfg.init_noise_scale, self.acc.device)
                self._add_replay(mb)
            mbs.append(mb)
        return mbs

    def _add_replay(self, mb: dict[str, torch.Tensor]) -> None:
        if self.replay is None:
            return
        n = round(self.cfg.train.replay_fraction * len(mb["input_ids"]))
        old = self.replay.sample(n)
        if old is not None:
            for key, rows in zip(("input_ids", "labels", "init_logits"), old):
                mb[key] = torch.cat([mb[key], rows])

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns its metrics (identical on all processes)."""
        mbs = self._micro_batches()
        counts = [scored(mb["labels"]) for mb in mbs]
        total = self.acc.reduce(torch.tensor(float(sum(counts)), device=self.acc.device), "sum").item()
        world = self.acc.num_processes
        loss_sum = torch.zeros((), device=self.acc.device)
        health = []
        for m, (mb, n) in enumerate(zip(mbs, counts)):
            sync = nullcontext() if m == len(mbs) - 1 else self.acc.no_sync(self.model)
            with sync:
                out = self.model(**mb)
                # DDP averages over processes, hence * world: the sum is the global token mean.
                self.acc.backward(out.loss * (n * world / max(total, 1.0)))
            loss_sum += out.loss.detach().float() * n
            if self.is_ebt:
                health.append(out)
                if self.replay is not None:
                    self.replay.add(mb["input_ids"], mb["labels"], out.logits.detach())
        loss = (self.acc.reduce(loss_sum, "sum") / max(total, 1.0)).item()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), clip))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            metrics["skipped"] = 1
            self.acc.print(f"step {self.step + 1}: non-finite loss {loss} / grad norm {grad_norm}; update skipped")
            if self.bad_steps >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteLoss(
                    f"{self.bad_steps} consecutive non-finite steps (last at step {self.step + 1}); stopped "
                    f"without saving. The last good checkpoint is in {self.out / 'checkpoints'}: lower train.lr "
                    f"(or the EBT's step size), then resume it"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if health:
            metrics.update(self._health(health))
        return metrics

    def _health(self, outs: list) -> dict[str, float]:
        """Inner-loop health: alpha, energy drop over the inner steps, loss after each step."""
        metrics = {"alpha": float(self.acc.unwrap_model(self.model).alpha.detach())}
        metrics["energy_drop"] = sum(float((o.energies[..., 0] - o.energies[..., -1]).mean()) for o in outs) / len(outs)
        steps = outs[-1].step_losses
        metrics.update({f"step_loss_{i + 1}": float(v) for i, v in enumerate(steps)})
        return metrics

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss and perplexity (EBT: also after ``eval.think_steps`` steps)."""
        model = self.acc.unwrap_model(self.model)
        model.eval()
        variants = {"": {}}
        if self.is_ebt:
            variants.update({f"_think{k}": {"think_steps": k} for k in self.cfg.eval.think_steps})
        sums = torch.zeros(len(variants) + 1, device=self.acc.device)
        for batch in self.val:
            ids, labels = batch["input_ids"].to(self.acc.device), batch["labels"].to(self.acc.device)
            n = scored(labels)
            with self.acc.autocast():
                for i, kwargs in enumerate(variants.values()):
                    sums[i] += model(ids, labels=labels, **kwargs).loss.float() * n
            sums[-1] += n
        sums = self.acc.reduce(sums, "sum")
        model.train()
        metrics = {}
        for i, suffix in enumerate(variants):
            loss = (sums[i] / sums[-1]).item()
            metrics[f"val/loss{suffix}"] = loss
            metrics[f"val/ppl{suffix}"] = math.exp(min(loss, 50.0))
        return metrics

    # ------------------------------------------------------------------ bookkeeping
    def _metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _log(self, metrics: dict[str, float]) -> None:
        if self.acc.is_main_process:
            with self._metrics_path().open("a") as f:
                f.write(json.dumps({"step": self.step, "tokens": self.tokens_seen, **metrics}) + "\n")
        self.acc.log(metrics, step=self.step)

    def _save(self) -> None:
        state = {"step": self.step, "tokens_seen": self.tokens_seen}
        C.save(self.acc, self.out / "checkpoints", self.step, state, {"data": self.batches.state_dict()}, self.replay, self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.acc
        if self.resume_from is not None:
            self._resume()
        elif acc.is_main_process:  # a fresh start in this run's folder (killed before its first checkpoint)
            self._metrics_path().unlink(missing_ok=True)
            if self.step >= cfg.train.max_steps and (self.out / "final").is_dir():
                acc.print(f"{self.out} is finished (step {self.step}); its export is in {self.out / 'final'}")
                return {}
        if acc.is_main_process:
            tracker_cfg = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat(to_dict(cfg)).items()}
            acc.init_trackers("tensorboard", config=tracker_cfg)
        tokens_per_step = self.global_batch * cfg.data.block_size
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        metrics: dict[str, float] = {}
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        while self.step < cfg.train.max_steps:
            metrics = self.train_step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            last = self.step == cfg.train.max_steps
            if self.step % cfg.train.log_every == 0 or last:
                rate = (self.tokens_seen - tokens0) / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rate:.0f}")
                metrics["tokens_per_s"] = rate
            bar.update(1)
            if self.step % cfg.eval.every == 0 or last:
                metrics.update(self.evaluate())
                bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/")))
            self._log(metrics)
            if self.step % cfg.checkpoint.every == 0 or last:
                self._save()
        bar.close()
        if not any(k.startswith("val/") for k in metrics):
            metrics.update(self.evaluate())
        if acc.is_main_process:
            export(acc.unwrap_model(self.model), self.tokenizer, self.out, cfg, self.tokens_seen, self.step, metrics)
        acc.wait_for_everyone()
        acc.end_training()
        return metrics
