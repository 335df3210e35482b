"""What the trainer asks of a model, with the defaults any Hugging Face causal LM satisfies.

The loop (``train/loop.py``) knows no model kind. A model may supply these hooks; where it does
not, the default holds, so a plain ``LlamaForCausalLM`` (the EBT's twin) needs none:

- ``model(**batch)`` in train mode: the output's ``loss`` is backpropagated (the objective);
  ``final_loss``, when present, is the detached cross-entropy of the final prediction and is
  logged as ``loss`` (the quantity ``val/loss`` measures), the objective as ``objective``.
  Default: ``loss`` is both.
- ``starting_candidates(rows, length, seed)``: training starts (B, length, V), passed as
  ``init_logits``, keyed on (seed, global row id) so they do not depend on the process count.
  Default: none.
- ``optimizer_overrides()``: ``{param_name: {"lr_scale": ..., "weight_decay": ...}}``, each such
  parameter in its own AdamW group. Default: ``{}``.
- ``replay_rows(batch, output)``: named rows to keep in the replay buffer, added to later
  batches by name. Default: none, and then ``train.replay_buffer_size`` must be 0.
- ``training_metrics(outputs)``: health of a step from its micro-batch outputs. Default: ``{}``.
- ``validation_variants(think_steps)``: suffix -> extra forward kwargs of validation (the
  metric ``val/loss<suffix>``). Default: ``{"": {}}``.
- class attribute ``ddp_find_unused_parameters``: a parameter may get no gradient in a step.
  Default: ``False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ebt.configuration_ebt import EBTConfig
from train.config import ConfigError, ModelConfig, ebt_config


def _ebt_class() -> type[PreTrainedModel]:
    from ebt import EBTForCausalLM

    return EBTForCausalLM


def _llama_class() -> type[PreTrainedModel]:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def _llama_config(config: EBTConfig) -> Any:
    from ebt import llama_twin_config

    return llama_twin_config(config)


# model.kind -> (its model class, its config from the run's EBTConfig). The Llama twin is built
# from the very same EBTConfig, hence the same vocabulary, width, depth, heads and context.
MODELS: dict[str, tuple[Callable[[], type[PreTrainedModel]], Callable[[EBTConfig], Any]]] = {
    "ebt": (_ebt_class, lambda config: config),
    "llama": (_llama_class, _llama_config),
}


def model_class(cfg: ModelConfig) -> type[PreTrainedModel]:
    """The class ``model.kind`` builds (known before the model exists: DDP settings depend on it)."""
    return MODELS[cfg.kind][0]()


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The run's model, its vocabulary and special tokens from ``tokenizer``."""
    ids = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    load_class, make_config = MODELS[cfg.kind]
    return load_class()(make_config(ebt_config(cfg, **ids)))


def check_trainer_settings(cls: type[PreTrainedModel], replay_buffer_size: int) -> None:
    """Trainer settings the model class cannot serve: config errors, raised before any work."""
    if replay_buffer_size and not hasattr(cls, "replay_rows"):
        raise ConfigError(
            f"train.replay_buffer_size={replay_buffer_size} needs a model that says what to replay "
            f"(replay_rows); {cls.__name__} has none: set train.replay_buffer_size=0"
        )


def ddp_find_unused_parameters(cls: type[PreTrainedModel]) -> bool:
    return bool(getattr(cls, "ddp_find_unused_parameters", False))


def final_loss(output: Any) -> torch.Tensor:
    """The quantity logged as the training ``loss`` (the same as ``val/loss``): detached."""
    final = getattr(output, "final_loss", None)
    return (output.loss if final is None else final).detach()


def has_objective(output: Any) -> bool:
    """True when the backpropagated loss is not the logged one (then it is logged as ``objective``)."""
    return getattr(output, "final_loss", None) is not None


def starting_inputs(model: PreTrainedModel, rows: torch.Tensor, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Extra training inputs of a micro-batch whose global row ids are ``rows``."""
    hook = getattr(model, "starting_candidates", None)
    return {} if hook is None else {"init_logits": hook(rows, length, seed)}


def optimizer_overrides(model: PreTrainedModel) -> dict[str, dict[str, float]]:
    hook = getattr(model, "optimizer_overrides", None)
    return {} if hook is None else hook()


def replay_rows(model: PreTrainedModel, batch: dict[str, torch.Tensor], output: Any) -> dict[str, torch.Tensor]:
    return model.replay_rows(batch, output)


def training_metrics(model: PreTrainedModel, outputs: list) -> dict[str, float]:
    hook = getattr(model, "training_metrics", None)
    return {} if hook is None else hook(outputs)


def validation_variants(model: PreTrainedModel, think_steps: list[int]) -> dict[str, dict]:
    hook = getattr(model, "validation_variants", None)
    return {"": {}} if hook is None else hook(list(think_steps))
