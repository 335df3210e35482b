"""One typed schema for a training run: dataclasses, a YAML file, dotted command-line overrides.

Why dataclasses: the schema *is* the documentation (``python -m train --help`` prints it), every
key has one type and one default, and an unknown or mistyped key fails before any work starts
instead of being silently ignored half-way through a long run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebt.configuration_ebt import EBTConfig
from ebt.recipes import RECIPES
from ebt.recipes import recipe as recipe_fields


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what was wrong and what to do."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
# Filled in from the tokenizer when the model is built, never from the run config.
FROM_TOKENIZER = ("vocab_size", "eos_token_id", "pad_token_id", "bos_token_id")
# Load-time validation builds the EBTConfig with this vocabulary, then discards it. It is large so that
# limits relative to the vocabulary (e.g. a count of negatives below vocab_size) pass here; they are
# checked when the model is built with the tokenizer's real vocabulary (still a ConfigError, exit 2).
PLACEHOLDER_VOCAB = 1 << 30


def _ebt_default(name: str) -> Any:
    """EBTConfig's own default of a field: the one source of model defaults."""
    return {f.name: f.default for f in dataclasses.fields(EBTConfig)}[name]


def ebt_keys() -> list[str]:
    """The EBTConfig fields ``model.ebt`` may set (its own fields minus sizes and tokenizer-given ones)."""
    return [k for k in inspect.get_annotations(EBTConfig) if k not in SIZES and k not in FROM_TOKENIZER]


@dataclass
class ModelConfig:
    kind: str = _f("ebt", "'ebt' (energy-based transformer) or 'llama' (its Transformer++ twin: same sizes)")
    recipe: str | None = _f(
        None, f"EBT training recipe preset from ebt.recipes ({', '.join(RECIPES)}); None: EBTConfig's defaults"
    )
    hidden_size: int = _f(_ebt_default("hidden_size"), "model width")
    intermediate_size: int = _f(_ebt_default("intermediate_size"), "SwiGLU hidden width (the paper uses = hidden_size)")
    num_hidden_layers: int = _f(_ebt_default("num_hidden_layers"), "number of transformer blocks")
    num_attention_heads: int = _f(_ebt_default("num_attention_heads"), "attention heads")
    max_position_embeddings: int = _f(
        _ebt_default("max_position_embeddings"), "longest context the model supports; must be >= data.block_size"
    )
    ebt: dict = _f({}, "any other EBTConfig field, on top of the recipe, e.g. {step_size: 4.0, train_steps_max: 4}")


def coerce_ebt(values: dict) -> dict:
    """``model.ebt`` values with EBTConfig's float fields made floats: YAML 1.1 reads ``1e30`` (no dot)
    as a string, and a string must not reach the model config."""
    kinds = {k: {part.strip() for part in str(v).split("|")} for k, v in inspect.get_annotations(EBTConfig).items()}
    out = {}
    for key, value in values.items():
        if "float" in kinds.get(key, ()) and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def ebt_config(cfg: ModelConfig, **from_tokenizer: Any) -> EBTConfig:
    """The run's ``EBTConfig``: its defaults <- ``model.recipe`` <- ``model.ebt`` <- sizes, tokenizer ids.

    The Llama twin is built from this very config (``ebt.llama_twin_config``), hence the same shape.
    """
    valid = ebt_keys()
    unknown = sorted(set(cfg.ebt) - set(valid))
    if unknown:
        where = [k for k in unknown if k in SIZES]
        hint = f" ({', '.join('model.' + k for k in where)} are set in the model section itself)" if where else ""
        raise ConfigError(f"model.ebt has unknown key(s) {unknown}{hint}; valid: {', '.join(valid)}")
    try:
        fields = recipe_fields(cfg.recipe) if cfg.recipe is not None else {}
    except ValueError as e:
        raise ConfigError(f"model.recipe: {e}") from None
    fields.update(coerce_ebt(cfg.ebt))
    fields.update({k: getattr(cfg, k) for k in SIZES})
    fields.update(from_tokenizer)
    try:
        return EBTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


@dataclass
class TokenizerConfig:
    kind: str = _f("char", "'char' (one token per character), 'sentencepiece' (trained here) or 'pretrained'")
    name_or_path: str | None = _f(None, "kind=pretrained: a Hub tokenizer name or a local folder")
    vocab_size: int = _f(8000, "kind=sentencepiece: vocabulary size")
    model_type: str = _f("bpe", "kind=sentencepiece: 'bpe' or 'unigram'")
    eos_token: str = _f("<eos>", "end-of-document token joining packed documents ('\\n' re-uses the newline)")
    train_chars: int = _f(20_000_000, "char/sentencepiece: at most this many training characters are read to build it")


@dataclass
class DataConfig:
    source: str = _f("tasks", "'tasks' (embedded reasoning tasks), a local file/folder/glob, or a Hub dataset name")
    format: str | None = _f(None, "local files: text|json|parquet|csv (default: from the extension)")
    hub_config: str | None = _f(None, "Hub dataset configuration name")
    train_split: str = _f("train", "split to train on")
    val_split: str | None = _f(None, "split to validate on; None: a deterministic slice of train (val_fraction / val_blocks)")
    text_column: str = _f("text", "column holding the text")
    prompt_column: str | None = _f(None, "with answer_column: prompt tokens are not scored (labels -100)")
    answer_column: str | None = _f(None, "column of the scored continuation")
    sample_by: str = _f("document", "text files: one example per 'document' (file), 'paragraph' or 'line'")
    streaming: bool = _f(False, "stream the source (large Hub corpora); validation = the first val_blocks blocks")
    block_size: int = _f(64, "tokens per packed training sequence")
    val_fraction: float = _f(0.1, "one-split sources: the last fraction of packed blocks is validation")
    val_blocks: int = _f(256, "streaming one-split sources: the first N packed blocks are validation")
    num_proc: int | None = _f(None, "processes for tokenisation (None: automatic, 1 for small data)")
    tasks: list = _f(["addition", "dyck"], "source=tasks: which tasks to mix (ebt.tasks.TASK_NAMES)")
    task_examples: int = _f(20_000, "source=tasks: training examples per task")
    task_val_examples: int = _f(500, "source=tasks: validation examples per task")
    shuffle_buffer: int = _f(10_000, "streaming: shuffle buffer size (0: no shuffling)")
    answer_block: int | None = _f(
        None,
        "prompt/answer sources: one example per row, its answer plus EOS padding in the last answer_block "
        "positions (all scored), the prompt left-padded before them (None: packed blocks); see docs/training.md",
    )


@dataclass
class TrainConfig:
    seed: int = _f(1337, "seed of model init, data order and the model's starting candidates")
    max_steps: int = _f(200, "optimizer steps")
    micro_batch_size: int = _f(12, "sequences per process per forward")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step; global batch = micro * accum * processes")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "cosine floor as a fraction of each parameter group's own peak lr")
    warmup_steps: int = _f(20, "linear warm-up steps")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices only; never norms, nor parameters the model exempts)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0: no clipping, still logged)")
    mixed_precision: str = _f("auto", "'auto' (bf16 on GPUs that support it), 'bf16' or 'fp32'")
    sharding: str = _f(
        "none",
        "several processes: 'none' (DDP), 'zero' (DDP + optimiser state sharded), 'fsdp_grad_op' or 'fsdp_full' "
        "(FSDP1, one unit: + gradients and parameters between steps); see docs/training.md",
    )
    replay_buffer_size: int = _f(
        0, "EBT S2 recipe: past final candidates kept per process, in rows (0: off; needs a model with replay_rows)"
    )
    replay_fraction: float = _f(0.5, "replayed rows added per micro-batch, as a fraction of its rows")
    max_nonfinite_steps: int = _f(3, "consecutive non-finite steps (skipped) before the run stops with an error")
    log_every: int = _f(10, "steps between progress-bar/tracker updates (metrics.jsonl gets every step)")


@dataclass
class EvalConfig:
    every: int = _f(100, "steps between validations (and at the end)")
    max_blocks: int = _f(128, "validation blocks evaluated (the same ones every time, split across processes)")
    think_steps: list = _f(
        [1, 2, 4], "EBT: also report validation loss after these numbers of thinking steps (the model's validation_variants)"
    )


@dataclass
class CheckpointConfig:
    every: int = _f(100, "steps between checkpoints (and at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    resume: str = _f("auto", "'auto' (latest checkpoint if any), 'never' (fresh run only) or a checkpoint folder")


@dataclass
class HubConfig:
    push_to_hub: bool = _f(False, "upload OUTPUT/final to the Hub at the end")
    repo_id: str | None = _f(None, "Hub repository, e.g. user/ebt-tiny")
    private: bool = _f(True, "create the repository private")


@dataclass
class RunConfig:
    output_dir: str = _f("runs/default", "run folder: checkpoints, metrics.jsonl, tensorboard, final/")
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against a field type; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its keys, got {value!r}")
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[tp]
    if not ok(value):
        raise ConfigError(f"{key} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys here: "
            f"{', '.join(prefix + k for k in hints)} (see python -m train --help)"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file <- ``key.sub=value`` overrides (values parsed as YAML: 3, 1e-3, [1,2], null)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass a YAML file such as configs/tiny.yaml or none")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    cfg = _build(RunConfig, tree)
    cfg.model.ebt = coerce_ebt(cfg.model.ebt)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every check that needs no data: types were checked by ``_build``; here values, the model's
    ``EBTConfig`` (built with a placeholder vocabulary) and cross-field rules."""
    from train.hooks import MODELS, check_trainer_settings, model_class  # what each model.kind builds

    choices = {
        "model.kind": (cfg.model.kind, tuple(MODELS)),
        "tokenizer.kind": (cfg.tokenizer.kind, ("char", "sentencepiece", "pretrained")),
        "tokenizer.model_type": (cfg.tokenizer.model_type, ("bpe", "unigram")),
        "data.sample_by": (cfg.data.sample_by, ("document", "paragraph", "line")),
        "train.mixed_precision": (cfg.train.mixed_precision, ("auto", "bf16", "fp32")),
        "train.sharding": (cfg.train.sharding, ("none", "zero", "fsdp_full", "fsdp_grad_op")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    positive = {
        "data.block_size": cfg.data.block_size,
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "eval.every": cfg.eval.every,
        "eval.max_blocks": cfg.eval.max_blocks,
        "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in flat(to_dict(cfg)).items():  # every float knob, model.ebt's included
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    t = cfg.train
    ranges = {
        "train.lr": (t.lr > 0, "> 0"),
        "train.min_lr_ratio": (0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        "train.weight_decay": (t.weight_decay >= 0, ">= 0"),
        "train.beta1": (0 <= t.beta1 < 1, "in [0, 1)"),
        "train.beta2": (0 <= t.beta2 < 1, "in [0, 1)"),
        "train.grad_clip": (t.grad_clip >= 0, ">= 0 (0: no clipping)"),
        "train.replay_fraction": (t.replay_fraction >= 0, ">= 0"),
        "train.warmup_steps": (t.warmup_steps >= 0, ">= 0"),
        "train.replay_buffer_size": (t.replay_buffer_size >= 0, ">= 0 (0: off)"),
        "train.log_every": (t.log_every >= 1, ">= 1"),
    }
    for key, (ok, allowed) in ranges.items():
        if not ok:
            raise ConfigError(f"{key} must be {allowed}, got {flat(to_dict(cfg))[key]}")
    ebt_config(cfg.model, vocab_size=PLACEHOLDER_VOCAB)  # a bad model key or value fails here, before any data work
    check_trainer_settings(model_class(cfg.model), cfg.train.replay_buffer_size)
    if cfg.data.block_size > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}; lower the block size or raise the model's positions"
        )
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.name_or_path:
        raise ConfigError("tokenizer.kind=pretrained needs tokenizer.name_or_path (a Hub name or a folder)")
    if (cfg.data.prompt_column is None) != (cfg.data.answer_column is None):
        raise ConfigError("set both data.prompt_column and data.answer_column, or neither")
    check_answer_block(cfg.data)
    if cfg.hub.push_to_hub and not cfg.hub.repo_id:
        raise ConfigError("hub.push_to_hub=true needs hub.repo_id (e.g. your-name/ebt-tiny)")


def check_answer_block(cfg: DataConfig) -> None:
    """``data.answer_block`` rows need a prompt and an answer per example, and room for both in a row.

    Also called when the rows are built, so a hand-made ``DataConfig`` fails as clearly as a run config.
    """
    m = cfg.answer_block
    if m is None:
        return
    if m < 2:
        raise ConfigError(
            f"data.answer_block must be >= 2 (the answer's tokens plus at least one EOS end marker), got {m}; "
            f"or null for packed blocks"
        )
    if cfg.source != "tasks" and not cfg.prompt_column:
        raise ConfigError(
            f"data.answer_block={m} lays out one prompt/answer example per row, but data.source={cfg.source!r} is "
            f"plain text: use source=tasks or set data.prompt_column and data.answer_column, or set data.answer_block=null"
        )
    if m >= cfg.block_size:
        raise ConfigError(
            f"data.answer_block={m} leaves no room for the prompt in data.block_size={cfg.block_size} (it needs at least "
            f"its leading EOS): raise data.block_size above {m} or lower data.answer_block"
        )


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: for trackers and for diffing two runs' configs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def reference(cls: type = RunConfig, prefix: str = "") -> str:
    """Every key with its type, default and help: the text of ``--help`` and of docs/training.md."""
    lines = []
    default = cls()
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}]")
            lines.append(reference(tp, f"{prefix}{f.name}."))
            continue
        name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {prefix}{f.name} ({name}) = {getattr(default, f.name)!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
