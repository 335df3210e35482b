"""The training loop on Accelerate: one loop for any causal LM, the EBT and its Transformer++ twin alike.

Same data, tokenizer, schedule and tokens seen for every kind, so their curves compare. The loop
knows no model kind: what differs (starting candidates, optimiser exceptions, replayed rows,
inner-loop health, validation variants) the model supplies through the hooks of
``train/hooks.py``. Design points (each is tested):

- The loss of a global batch is the token-weighted mean over all its scored tokens, whatever
  the number of processes and micro-batches: each micro-batch's mean loss is weighted by its
  share of the batch's scored tokens (counted with one all-reduce). With DDP's gradient
  averaging this makes N processes compute the same gradients as one.
- Starting candidates (a model's ``starting_candidates`` hook) are keyed on (train.seed, step,
  row of the global batch), so they too do not depend on the process count; replayed rows come
  from a per-process buffer.
- The logged training ``loss`` is the token-weighted cross-entropy of the final prediction, the
  quantity ``val/loss`` measures; a model whose objective differs logs it as ``objective``.
- Non-finite policy: a step whose loss or gradient norm is not finite is skipped (no update,
  logged); ``train.max_nonfinite_steps`` consecutive ones stop the run with
  :class:`NonFiniteLoss` before anything is saved, so the last good checkpoint survives. No
  checkpoint is written while a streak of skipped steps lasts (it is written after the next
  good step), and a run that ends in one is not exported. The weights are covered too: after
  every update one fused max-abs over the trained parameters (reduced across processes), and
  before every checkpoint and the export a check of all weights and optimiser state; a
  non-finite value stops the run with :class:`NonFiniteWeights` (exit 3), nothing saved.
- The learning-rate schedule is a pure function of the step (:func:`lr_factor`), set by hand
  before each update: nothing to checkpoint, and a resume with other learning-rate settings
  (resumable changes, ``train/checkpoint.py``) simply follows the new schedule.
- Start-up (``Trainer.__init__``): the main process locks the run folder and decides fresh
  start / resume / finished under the lock, then tells the other processes; a start that
  fails removes only what it created (``checkpoint.RunFolder``).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from train import checkpoint as C
from train import data as D
from train import hooks
from train import sharding as S
from train.batches import training_batches, val_rows
from train.config import RunConfig, TrainConfig, flat, to_dict
from train.export import export
from train.hooks import build_model
from train.replay import ReplayBuffer
from train.tokenizer import build_tokenizer, load_tokenizer

# The starting candidates of optimizer step ``step`` are keyed on this seed and the global row.
STEP_SEED = 1_000_003
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite steps; the run stopped without saving."""


class NonFiniteWeights(NonFiniteLoss):
    """An update left a weight (or optimiser state) non-finite; the run stopped without saving."""


def make_accelerator(cfg: RunConfig, find_unused_parameters: bool = False) -> Accelerator:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    mp = "no" if mp == "fp32" else mp  # Accelerate's name
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    # The model class says whether a parameter may get no gradient in a step (the EBT: the step
    # embedding of an unused step count); without find_unused_parameters DDP then leaves the
    # first step's gradients un-averaged, silently.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
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
            f"distributed type {acc.distributed_type.value} is not supported: the trainer shards the model "
            f"itself (train.sharding=zero|fsdp_full|fsdp_grad_op, each tested equal to one process with the "
            f"EBT's second-order gradients). Accelerate's FSDP plugin is not used: FSDP2 with create_graph=True "
            f"errors or returns no gradients (pytorch#172543), per-layer FSDP1 units miss the EBT's re-use of "
            f"layer weights, and on CPU the plugin silently falls back to DDP, so it cannot be tested; "
            f"DeepSpeed is not integrated (its engine owns backward, optimiser and checkpoints). Launch with a "
            f"DDP config, e.g. accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m train ... "
            f"train.sharding=fsdp_full"
        )
    return acc


def build_optimizer(model: PreTrainedModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: matrices decay, vectors (norms) don't; a parameter the model overrides gets its own group
    with ``lr * lr_scale`` and its own weight decay (the EBT's learnable step size). Built on the
    unwrapped model, before any sharding flattens its parameters (``train/sharding.py``)."""
    overrides = hooks.optimizer_overrides(model)
    named = dict(model.named_parameters())
    unknown = sorted(set(overrides) - set(named))
    if unknown:
        raise ValueError(f"{type(model).__name__}.optimizer_overrides names no parameter {unknown}")
    decay = [p for n, p in named.items() if p.requires_grad and n not in overrides and p.ndim >= 2]
    no_decay = [p for n, p in named.items() if p.requires_grad and n not in overrides and p.ndim < 2]
    groups = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
    ]
    for name, spec in overrides.items():
        if named[name].requires_grad:
            lr, decay_rate = cfg.lr * spec.get("lr_scale", 1.0), spec.get("weight_decay", cfg.weight_decay)
            groups.append({"params": [named[name]], "lr": lr, "weight_decay": decay_rate})
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to ``min_lr_ratio``; a factor, so each group keeps its own floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scored(labels: torch.Tensor) -> int:
    """Tokens that get a loss: labels are shifted inside the model, so position 0 never counts."""
    return int((labels[:, 1:] != D.IGNORE).sum())


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.acc = make_accelerator(cfg, hooks.ddp_find_unused_parameters(hooks.model_class(cfg.model)))
        self.folder = C.RunFolder(self.out) if self.acc.is_main_process else None
        try:
            start = self._open()
            self.resume_from = None if start.resume is None else Path(start.resume)
            self.finished, self.changes = start.finished, start.changes
            if self.finished:  # nothing to do, and nothing is touched
                return
            self._setup()
            if self.resume_from is not None:  # the rest: optimiser, RNG, replay, data position
                self._load()
        except BaseException:
            if self.folder is not None:  # remove what this start created, nothing else; release the lock
                self.folder.abandon()
            raise

    def _open(self) -> C.Start:
        """The main process locks the folder and decides (fresh, resume, finished); every process gets the decision."""
        acc = self.acc
        if acc.is_main_process:
            try:
                self.folder.open()
                start = C.prepare_output(self.out, self.cfg, acc.num_processes)
                if not start.finished and not (self.out / "run_config.yaml").exists():
                    C.write_run_config(self.out, self.cfg)
            except BaseException as e:
                _broadcast_text(acc, json.dumps({"error": f"{e}" if isinstance(e, C.CheckpointError) else repr(e)}))
                raise
            for note in start.notes:
                acc.print(f"warning: {note}")
            _broadcast_text(acc, start.to_json())
            return start
        decision = json.loads(_broadcast_text(acc, None))
        if "error" in decision:
            raise C.CheckpointError(f"the main process could not start the run: {decision['error']}")
        return C.Start(**decision)

    def _setup(self) -> None:
        cfg, t, world = self.cfg, self.cfg.train, self.acc.num_processes
        set_seed(t.seed)
        self.tokenizer, blocks = self._data()
        model = build_model(cfg.model, self.tokenizer)
        set_seed(t.seed + self.acc.process_index)  # the model's own draws differ per process
        if self.resume_from is not None:  # full weights, into the model before any wrapping shards them
            C.load_weights(self.resume_from, model)
        optimizer = build_optimizer(model, t)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]  # the schedule's peaks, per group
        self.sharding = S.Sharding(t.sharding, self.acc)
        self.model, self.optimizer = self.sharding.prepare(model, optimizer)
        self.trained = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.replay = ReplayBuffer(t.replay_buffer_size) if t.replay_buffer_size else None
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * world
        rank = self.acc.process_index
        self.batches = training_batches(blocks.train, self.global_batch, rank, world, t.seed, cfg.data.shuffle_buffer)
        self.val = val_rows(blocks.val, cfg.eval.max_blocks, rank, world, t.micro_batch_size)
        self.step, self.tokens_seen, self.bad_steps, self.save_due = 0, 0, 0, False

    # ------------------------------------------------------------------ setup
    def _data(self) -> tuple[PreTrainedTokenizerBase, D.Blocks]:
        """The run's tokenizer (built once, re-used on resume) and its blocks (train/data.py)."""
        cfg, acc = self.cfg, self.acc
        tok_dir = self.out / "tokenizer"
        with acc.main_process_first():  # main builds tokenizer and data caches, the others re-use them
            raw = D.read_split(cfg.data, "train", cfg.train.seed)
            if tok_dir.is_dir():
                tokenizer = load_tokenizer(tok_dir)
            else:
                tokenizer = build_tokenizer(cfg.tokenizer, D.texts(cfg.data, raw))
                if acc.is_main_process:
                    tokenizer.save_pretrained(str(tok_dir))
            blocks = D.build_blocks(cfg.data, tokenizer, raw, cfg.train.seed)
        return tokenizer, blocks

    def _load(self) -> None:
        """Optimiser state, RNG, replay buffer and data position from the (verified) checkpoint (its weights
        were loaded into the model before wrapping: ``_setup``)."""
        state, process_state = C.load(self.acc, self.resume_from, self._optimizer_io(), self.replay)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.batches.load_state_dict(process_state["data"])

    def _optimizer_io(self) -> C.OptimizerIO:
        sh, model, opt = self.sharding, self.model, self.optimizer
        return C.OptimizerIO(
            shapes=sh.shapes,
            groups=[{k: v for k, v in g.items() if k != "params"} | {"size": len(g["params"])} for g in opt.param_groups],
            load=lambda sd: sh.load_optimizer_state(model, opt, sd),
            non_finite=lambda: C.non_finite(sh.module, sh.local_optimizer_state(opt)),
        )

    def _resume_log(self) -> None:
        """Drop what the interrupted run logged after the checkpoint (and a line torn by a kill)."""
        path = self._metrics_path()
        if not self.acc.is_main_process or not path.exists():
            return
        lines = path.read_text().splitlines()
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append((json.loads(line)["step"], line))
            except (ValueError, KeyError, TypeError):
                if i < len(lines) - 1:
                    raise C.CheckpointError(
                        f"{path} line {i + 1} is not a metrics row ({line[:60]!r}); fix or remove that line, then resume"
                    ) from None
                self.acc.print(f"note: dropped the torn last line of {path} ({line[:60]!r}): the run was killed writing it")
        C.write_atomic(path, "".join(line + "\n" for step, line in rows if step <= self.step))

    # ------------------------------------------------------------------ one step
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the current global batch, with the model's extra inputs."""
        t, rank, world = self.cfg.train, self.acc.process_index, self.acc.num_processes
        model = self.sharding.module
        seed = t.seed * STEP_SEED + self.step  # the same on every process: starts depend on the global row only
        mbs = []
        for m in range(t.grad_accum_steps):
            first = (m * world + rank) * t.micro_batch_size
            mb = {k: v.to(self.acc.device) for k, v in self.batches.micro(self.step, first, t.micro_batch_size).items()}
            rows = torch.arange(first, first + len(mb["input_ids"]), device=self.acc.device)
            mb.update(hooks.starting_inputs(model, rows, mb["input_ids"].shape[1], seed))
            self._add_replay(mb)
            mbs.append(mb)
        return mbs

    def _add_replay(self, mb: dict[str, torch.Tensor]) -> None:
        if self.replay is None:
            return
        old = self.replay.sample(round(self.cfg.train.replay_fraction * len(mb["input_ids"])))
        if old is None:
            return
        missing = sorted(set(old) - set(mb))
        if missing:
            raise ValueError(f"replayed rows carry {missing}, which the training batch lacks (batch keys: {sorted(mb)})")
        for key, rows in old.items():
            mb[key] = torch.cat([mb[key], rows])

    def _set_lr(self) -> float:
        """The schedule at the current step: each group's peak times :func:`lr_factor` (no scheduler state)."""
        factor = lr_factor(self.step, self.cfg.train)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def _weights_bad(self, tensors: list[torch.Tensor]) -> bool:
        """True when any of ``tensors`` on any process holds a NaN or an infinity (all processes agree)."""
        return bool(self.acc.reduce(C.finite_flag(tensors).to(self.acc.device), "sum").item())

    def _recovery(self) -> str:
        """What to do after a non-finite stop (the documented recovery)."""
        ckpts = C.checkpoints(self.out / "checkpoints")
        where = f"it resumes from {ckpts[-1]}" if ckpts else "no checkpoint is left, so it starts afresh"
        return (
            f"lower train.lr and re-run the command ({where}); a model setting such as model.ebt.step_size "
            f"needs a new output_dir"
        )

    def _stop_non_finite(self, when: str) -> None:
        model = self.sharding.module
        what = C.non_finite(model, self.sharding.local_optimizer_state(self.optimizer)) or "on another process"
        raise NonFiniteWeights(
            f"{when}: non-finite weights or optimiser state ({what}); stopped without saving or exporting; {self._recovery()}"
        )

    def _stop_streak(self, what: str, last_bad: int) -> None:
        """Stop on a streak of skipped steps. The checkpoint written just before it began holds the weights
        whose loss was non-finite: it is set aside (``checkpoint-N.nonfinite``), so a re-run does not resume it."""
        before = last_bad - self.bad_steps  # the last step before the streak
        suspect = self.out / "checkpoints" / f"{C.PREFIX}{before:08d}"
        found = suspect.is_dir()  # looked at by every process before the main one moves it
        note = f" {suspect.name}, written just before the streak, gave it and was set aside as {suspect.name}.nonfinite;"
        self.acc.wait_for_everyone()
        if found and self.acc.is_main_process:
            aside = suspect.with_name(suspect.name + ".nonfinite")
            shutil.rmtree(aside, ignore_errors=True)  # an earlier failure at the same step
            suspect.rename(aside)
        self.acc.wait_for_everyone()
        note = note if found else ""
        raise NonFiniteLoss(f"{what}; stopped without saving or exporting;{note} {self._recovery()}")

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns its metrics (identical on all processes)."""
        lr = self._set_lr()
        mbs = self._micro_batches()
        model, sh = self.sharding.module, self.sharding
        counts = [scored(mb["labels"]) for mb in mbs]
        total = self.acc.reduce(torch.tensor(float(sum(counts)), device=self.acc.device), "sum").item()
        world = self.acc.num_processes
        sums = torch.zeros(2, device=self.acc.device)  # token-weighted final-prediction loss, objective
        outputs = []
        for m, (mb, n) in enumerate(zip(mbs, counts)):
            with sh.no_sync(self.model, m == len(mbs) - 1):
                with self.acc.autocast() if sh.own_autocast else nullcontext():
                    out = self.model(**mb)
                # DDP averages over processes, hence * world: the sum is the global token mean.
                self.acc.backward(out.loss * (n * world / max(total, 1.0)))
            sums += torch.stack([hooks.final_loss(out).float(), out.loss.detach().float()]) * n
            outputs.append(out)
            if self.replay is not None:
                self.replay.add(hooks.replay_rows(model, mb, out))
        loss, objective = (self.acc.reduce(sums, "sum") / max(total, 1.0)).tolist()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = sh.clip_grad_norm(self.model, clip)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
        if hooks.has_objective(outputs[-1]):
            metrics["objective"] = objective
        if all(math.isfinite(v) for v in (loss, objective, grad_norm)):
            self.optimizer.step()
            self.bad_steps = 0
            if self._weights_bad(self.trained):  # one fused check of what the update changed
                self._stop_non_finite(f"step {self.step + 1}'s update")
        else:
            self.bad_steps += 1
            metrics["skipped"] = 1
            self.acc.print(
                f"step {self.step + 1}: non-finite loss {loss} / objective {objective} / grad norm {grad_norm}; update skipped"
            )
            if self.bad_steps >= self.cfg.train.max_nonfinite_steps:
                last = self.step + 1
                self._stop_streak(f"{self.bad_steps} consecutive non-finite steps (the last at step {last})", last)
        self.optimizer.zero_grad(set_to_none=True)
        with sh.full_parameters(self.model):  # the model's health metrics read its (sharded) weights
            metrics.update(hooks.training_metrics(model, outputs))
        return metrics

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss and perplexity, also of the model's validation variants."""
        model = self.sharding.module
        forward = self.sharding.eval_model(self.model)
        model.eval()
        variants = hooks.validation_variants(model, self.cfg.eval.think_steps)
        sums = torch.zeros(len(variants) + 1, device=self.acc.device)
        for batch in self.val:
            ids, labels = batch["input_ids"].to(self.acc.device), batch["labels"].to(self.acc.device)
            # answer-block rows (data.answer_block) mask their left padding; packed blocks have no mask
            mask = {"attention_mask": batch["attention_mask"].to(self.acc.device)} if "attention_mask" in batch else {}
            n = scored(labels)
            with self.acc.autocast():
                for i, kwargs in enumerate(variants.values()):
                    sums[i] += forward(ids, labels=labels, **mask, **kwargs).loss.float() * n
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

    def _log(self, metrics: dict[str, float], extra: dict | None = None) -> None:
        """One metrics.jsonl row (``extra``: JSON-only fields, not sent to the trackers)."""
        if self.acc.is_main_process:
            with self._metrics_path().open("a") as f:
                f.write(json.dumps({"step": self.step, "tokens": self.tokens_seen, **metrics, **(extra or {})}) + "\n")
        self.acc.log(metrics, step=self.step)

    def _all_state(self) -> list[torch.Tensor]:
        """This process's weights and optimiser state (its shards): checks reduce over all processes."""
        state = self.sharding.local_optimizer_state(self.optimizer)
        opt = [t for s in state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
        return [p for p in self.sharding.module.parameters() if p.is_floating_point()] + opt

    def _save(self) -> None:
        if self._weights_bad(self._all_state()):
            self._stop_non_finite(f"checkpoint at step {self.step}")
        state = {"step": self.step, "tokens_seen": self.tokens_seen}
        C.save(
            self.acc,
            self.out / "checkpoints",
            self.step,
            state,
            {"data": self.batches.state_dict()},
            self.sharding.model_state(self.model) or self.sharding.module,
            self.sharding.optimizer_state(self.model, self.optimizer),
            self.replay,
            self.cfg.checkpoint.keep_last,
        )

    def close(self) -> None:
        """Release the run folder (the main process's lock); also done when :meth:`run` ends, however it ends."""
        if self.folder is not None:
            self.folder.release()

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, float]:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.acc
        if self.finished:
            acc.print(f"{self.out} is finished ({cfg.train.max_steps} steps); its export is in {self.out / 'final'}")
            return {}
        extra = {}
        if self.resume_from is not None:
            self._resume_log()
            acc.print(f"resumed from {self.resume_from} at step {self.step}")
        elif acc.is_main_process:  # a fresh start in this run's folder (killed before its first checkpoint)
            self._metrics_path().unlink(missing_ok=True)
        if self.changes:
            if acc.is_main_process:
                C.write_run_config(self.out, cfg)
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items())
            acc.print(f"settings changed since the run's last start: {shown}")
            extra["changed"] = self.changes  # on the first row logged from here on
        if acc.is_main_process:
            tracker_cfg = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat(to_dict(cfg)).items()}
            acc.init_trackers("tensorboard", config=tracker_cfg)
        tokens_per_step = self.global_batch * cfg.data.block_size
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        metrics: dict[str, float] = {}
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        try:
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
                    bar.write(
                        f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
                    )
                self._log(metrics, extra)
                extra = {}
                if self.step % cfg.checkpoint.every == 0 or last or self.save_due:
                    if self.bad_steps:  # never a checkpoint inside a streak of skipped steps: after the next good one
                        self.save_due = True
                        acc.print(f"step {self.step}: checkpoint deferred (the step was skipped as non-finite)")
                    else:
                        self._save()
                        self.save_due = False
        finally:
            bar.close()  # also on an error: its message then starts a line of its own
        if self.bad_steps:
            self._stop_streak(f"the run ended in {self.bad_steps} consecutive non-finite step(s)", self.step)
        if not any(k.startswith("val/") for k in metrics):
            metrics.update(self.evaluate())
        if self._weights_bad(self._all_state()):
            self._stop_non_finite("before the export")
        weights = self.sharding.model_state(self.model)  # gathered by every process under FSDP
        if acc.is_main_process:
            export(self.sharding.module, self.tokenizer, self.out, cfg, self.tokens_seen, self.step, metrics, weights)
        self._close()
        return metrics

    def _close(self) -> None:
        """Release the wrapped model and optimiser while every process's group is still up, then end.

        DDP's reducer (and FSDP) hold the gloo process group: freed only after end_training()
        destroyed the group, its destructor waited forever for a peer that had already exited
        (seen as a hung 2-process run whose training had finished). So: drop them, wait for every
        process, then let Accelerate stop the trackers and destroy the group.
        """
        self.model = self.optimizer = self.sharding = None
        self.acc.free_memory()  # Accelerate's own references to the prepared model and optimiser
        gc.collect()
        self.acc.wait_for_everyone()
        self.acc.end_training()


def _broadcast_text(acc: Accelerator, text: str | None) -> str:
    """``text`` of the main process, on every process (tensors only: nothing is pickled)."""
    if acc.num_processes == 1:
        return text
    import torch.distributed as dist

    data = torch.tensor(list(text.encode()) if acc.is_main_process else [], dtype=torch.uint8, device=acc.device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=acc.device)
    dist.broadcast(size, 0)
    if not acc.is_main_process:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=acc.device)
    dist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()
