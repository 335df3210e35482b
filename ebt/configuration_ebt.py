"""Configuration of the energy-based transformer (EBT).

Self-contained on purpose: this file is copied next to a checkpoint by ``save_pretrained`` so the
checkpoint loads with ``trust_remote_code=True`` where the ``ebt`` package is not installed. It
may import only the standard library, torch and transformers.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

UPDATE_RULES = ("probability", "logit", "mirror")
SECOND_ORDER = ("all", "last")
LOSS_ON = ("all", "last")
INFERENCE_INITS = ("noise", "uniform")


def _invalid(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"EBTConfig.{field}={value!r} is invalid: {allowed}.")


class EBTConfig(PreTrainedConfig):
    r"""Llama-style backbone plus every knob of the inner optimisation loop.

    The inner loop refines a candidate distribution ``z`` (logits over the vocabulary) for every
    position by gradient descent on the energy. The knobs mirror the two published recipes (see
    DESIGN.md §3): ``S1`` = 2 detached steps, alpha 500 learnable, loss on all steps; ``S2`` =
    random 2-3 steps, alpha 5 fixed with random per-position scale, Langevin noise 3, only the
    last step second order, loss on the last step.

    Update rules (``update_rule``):
        - ``probability``: ``z <- softmax(z) - alpha * dE/dp`` (the reference code's rule);
        - ``logit``: ``z <- z - alpha * dE/dz`` (plain gradient descent on the logits);
        - ``mirror``: ``z <- z - alpha * dE/dp`` (exponentiated gradient on the simplex).

    Inference defaults (``inference_*``) are what callers that know nothing of thinking get, such as
    ``generate``, pipelines and evaluation harnesses; ``think()`` arguments override them.
    """

    model_type = "ebt"
    keys_to_ignore_at_inference = ["past_key_values"]

    # Backbone (Llama conventions).
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_candidate_embeddings: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # Inner loop.
    update_rule: str = "probability"
    step_size: float = 500.0
    step_size_learnable: bool = True
    step_size_lr_multiplier: float = 1500.0
    step_size_random_scale: float = 1.0
    train_steps: int = 2
    train_steps_max: int | None = None
    langevin_noise: float = 0.0
    detach_between_steps: bool = True
    second_order: str = "all"
    loss_on: str = "all"
    step_embeddings: bool = True
    init_noise_scale: float = 1.0

    # What thinking callers get by default.
    inference_steps: int | None = None
    inference_samples: int = 1
    inference_tolerance: float | None = None
    inference_init: str = "noise"
    inference_seed: int = 0

    def __post_init__(self, **kwargs):
        self._validate_ebt()
        super().__post_init__(**kwargs)

    def _validate_ebt(self) -> None:
        positive_ints = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "train_steps",
            "inference_samples",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _invalid(name, value, "must be an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise _invalid(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads={self.num_attention_heads}",
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise _invalid("hidden_size", self.hidden_size, "the head size (hidden_size / heads) must be even for RoPE")
        choices = {
            "update_rule": UPDATE_RULES,
            "second_order": SECOND_ORDER,
            "loss_on": LOSS_ON,
            "inference_init": INFERENCE_INITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise _invalid(name, getattr(self, name), f"allowed values are {', '.join(allowed)}")
        if not self.step_size > 0:
            raise _invalid("step_size", self.step_size, "must be > 0")
        if not self.step_size_lr_multiplier > 0:
            raise _invalid("step_size_lr_multiplier", self.step_size_lr_multiplier, "must be > 0")
        if not self.step_size_random_scale >= 1:
            raise _invalid(
                "step_size_random_scale",
                self.step_size_random_scale,
                "must be >= 1 (1 = fixed; s draws alpha uniformly in [alpha/s, alpha*s])",
            )
        if self.train_steps_max is not None and (
            not isinstance(self.train_steps_max, int) or self.train_steps_max < self.train_steps
        ):
            raise _invalid("train_steps_max", self.train_steps_max, f"must be None or an integer >= train_steps={self.train_steps}")
        for name in ("langevin_noise", "init_noise_scale", "rms_norm_eps", "initializer_range"):
            if not getattr(self, name) >= 0:
                raise _invalid(name, getattr(self, name), "must be >= 0")
        if self.inference_steps is not None and (
            isinstance(self.inference_steps, bool) or not isinstance(self.inference_steps, int) or self.inference_steps < 1
        ):
            raise _invalid("inference_steps", self.inference_steps, "must be None (= the trained step count) or an integer >= 1")
        if self.inference_tolerance is not None and not self.inference_tolerance >= 0:
            raise _invalid("inference_tolerance", self.inference_tolerance, "must be None (off) or >= 0")

    @property
    def max_train_steps(self) -> int:
        """The largest step count training uses (also the number of step embeddings)."""
        return self.train_steps_max if self.train_steps_max is not None else self.train_steps

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def default_inference_steps(self) -> int:
        return self.inference_steps if self.inference_steps is not None else self.max_train_steps


__all__ = ["EBTConfig"]
