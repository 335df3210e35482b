"""Configuration of the energy-based transformer (EBT).

Self-contained on purpose: this file is copied next to a checkpoint by ``save_pretrained`` so the
checkpoint loads with ``trust_remote_code=True`` where the ``ebt`` package is not installed. It
may import only the standard library, torch and transformers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedConfig

UPDATE_RULES = ("probability", "logit", "mirror")
SECOND_ORDER = ("all", "last")
LOSS_ON = ("all", "last")
INFERENCE_INITS = ("noise", "uniform", "draft")
STEP_SIZE_SCHEDULES = ("constant", "linear", "cosine", "inverse_sqrt")
SELECTIONS = ("energy", "average")
HALTINGS = ("energy", "residual")


def _invalid(owner: str, field_name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{field_name}={value!r} is invalid: {allowed}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _setting(help: str) -> Any:
    """A ThinkingConfig field: None means "the checkpoint's default" (its ``inference_*`` field)."""
    return field(default=None, metadata={"help": help})


@dataclass
class ThinkingConfig:
    """Every setting of thinking (inference-time energy minimisation), validated in one place.

    The twin of ``transformers.GenerationConfig``: ``think()``, ``forward`` (eval mode),
    ``generate`` (also inside a ``GenerationConfig``), the lm-eval ``ebt`` model and every
    ``python -m eval`` command take this object or its field names (``think_<field>`` where a
    name could clash, e.g. ``model(ids, think_steps=4)``). A field left ``None`` takes the
    checkpoint's default, stored in ``EBTConfig.inference_<field>`` and saved with the model;
    :meth:`resolve` fills them in.
    """

    steps: int | None = _setting(
        "inner optimisation steps per position (0 = the starting candidate); default: the trained count "
        "(EBTConfig.trained_steps)"
    )
    step_size: float | None = _setting("step size alpha (> 0); default: the model's learned/fixed alpha")
    step_size_schedule: str | None = _setting(
        f"how alpha changes over the steps: {', '.join(STEP_SIZE_SCHEDULES)} (linear/cosine decay towards 0 over `steps`)"
    )
    samples: int | None = _setting("random starts per position (self-verification)")
    selection: str | None = _setting(
        "how the samples combine: 'energy' (the lowest final energy wins) or 'average' (mean of their distributions)"
    )
    noise: float | None = _setting("Langevin noise sigma added to the logits before each step (>= 0)")
    temperature: float | None = _setting("Langevin temperature T (>= 0): the noise std is noise * sqrt(T)")
    tolerance: float | None = _setting(
        "adaptive computation: a position stops once a step changes it by less than this (>= 0); see halting"
    )
    halting: str | None = _setting(
        "what tolerance measures: 'energy' (how much a step lowered the position's energy) or 'residual' "
        "(how far a step moved its distribution: the largest change of a probability)"
    )
    accept_decrease: bool | None = _setting("undo a step that raised a position's energy and halve its step size")
    seed: int | None = _setting("seed of the random starts and noise (keyed on absolute position: batch-invariant)")
    init: str | None = _setting(
        f"starting candidates: {', '.join(INFERENCE_INITS)} (uniform/draft: the first start is the uniform "
        "distribution / the draft head's prediction, further starts add noise; draft needs a model with draft_head)"
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation (the one place)
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what is allowed."""

        def bad(name: str, allowed: str) -> ValueError:
            return _invalid("ThinkingConfig", name, getattr(self, name), allowed)

        if self.steps is not None and not (_is_int(self.steps) and self.steps >= 0):
            raise bad("steps", "must be an integer >= 0 (or None for the checkpoint's default)")
        if self.samples is not None and not (_is_int(self.samples) and self.samples >= 1):
            raise bad("samples", "must be an integer >= 1")
        if self.seed is not None and not (_is_int(self.seed) and self.seed >= 0):
            raise bad("seed", "must be an integer >= 0")
        if self.step_size is not None and not (_is_number(self.step_size) and self.step_size > 0):
            raise bad("step_size", "must be a finite number > 0 (or None for the model's alpha)")
        for name in ("noise", "temperature", "tolerance"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value >= 0):
                raise bad(name, "must be a finite number >= 0")
        if self.accept_decrease is not None and not isinstance(self.accept_decrease, bool):
            raise bad("accept_decrease", "must be true or false")
        choices = {
            "step_size_schedule": STEP_SIZE_SCHEDULES,
            "selection": SELECTIONS,
            "init": INFERENCE_INITS,
            "halting": HALTINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise bad(name, f"allowed values are {', '.join(allowed)}")

    # ------------------------------------------------------------------ building and merging
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ThinkingConfig:
        """Build from a dict; an unknown key is an error that lists the valid ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown thinking setting(s) {unknown}; valid: {', '.join(cls.field_names())}.")
        return cls(**values)

    @classmethod
    def from_model_config(cls, config: EBTConfig) -> ThinkingConfig:
        """The checkpoint's defaults: its ``inference_<field>`` values."""
        return cls(**{name: getattr(config, f"inference_{name}") for name in cls.field_names()})

    def merged(self, other: ThinkingConfig | dict | None = None, **overrides: Any) -> ThinkingConfig:
        """A copy where the non-None fields of ``other`` and then of ``overrides`` replace these."""
        values = self.to_dict()
        for layer in (other, overrides):
            if layer is None:
                continue
            given = layer.to_dict() if isinstance(layer, ThinkingConfig) else layer
            unknown = sorted(set(given) - set(values))
            if unknown:
                raise ValueError(f"unknown thinking setting(s) {unknown}; valid: {', '.join(values)}.")
            values.update({k: v for k, v in given.items() if v is not None})
        return ThinkingConfig(**values)

    def resolve(self, config: EBTConfig) -> ThinkingConfig:
        """Fill every unset field from the checkpoint; ``steps`` None becomes the trained count.

        Only ``step_size`` may stay None afterwards (= use the model's alpha).
        """
        resolved = ThinkingConfig.from_model_config(config).merged(self)
        if resolved.steps is None:
            resolved.steps = config.trained_steps
        return resolved

    @classmethod
    def pop_prefixed(cls, kwargs: dict[str, Any], prefix: str = "think_") -> dict[str, Any]:
        """Remove ``think_<field>`` keys from ``kwargs`` and return them as ``{field: value}``."""
        return {
            key[len(prefix) :]: kwargs.pop(key)
            for key in list(kwargs)
            if key[len(prefix) :] in cls.field_names() and key.startswith(prefix)
        }

    def step_size_factor(self, step: int) -> float:
        """The schedule's multiplier of alpha at inner step ``step`` (0-based) of ``self.steps``."""
        schedule, total = self.step_size_schedule or "constant", max(self.steps or 1, 1)
        if schedule == "linear":
            return 1.0 - step / total
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * step / total))
        if schedule == "inverse_sqrt":
            return 1.0 / math.sqrt(step + 1)
        return 1.0


class EBTConfig(PreTrainedConfig):
    r"""Llama-style backbone plus every knob of the inner optimisation loop.

    The inner loop refines a candidate distribution ``z`` (logits over the vocabulary) for every
    position by gradient descent on the energy. The knobs mirror the two published recipes (see
    docs/design.md): ``S1`` = 2 detached steps, alpha 500 learnable, loss on all steps; ``S2`` =
    random 2-3 steps, alpha 5 fixed with random per-position scale, Langevin noise 3, only the
    last step second order, loss on the last step.

    Update rules (``update_rule``):
        - ``probability``: ``z <- softmax(z) - alpha * dE/dp`` (the reference code's rule);
        - ``logit``: ``z <- z - alpha * dE/dz`` (plain gradient descent on the logits);
        - ``mirror``: ``z <- z - alpha * dE/dp`` (exponentiated gradient on the simplex).

    The recipes are named presets in ``ebt.recipes`` (``EBTConfig(**RECIPES["s2"], ...)``).

    Inference defaults (``inference_<field>``, one per ``ThinkingConfig`` field) are what callers
    that know nothing of thinking get, such as ``generate``, pipelines and evaluation harnesses; a
    ``ThinkingConfig`` passed to ``think()``, ``forward`` or ``generate`` overrides them.
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
    # Convergent refinement (mirror rule): the candidates minimise E(p) + kl_weight * KL(p || q),
    # q the draft's distribution (uniform without a draft head, i.e. an entropy bonus). The step is
    # z <- (1 - alpha kl_weight) z + alpha kl_weight z_q - alpha dE/dp: its fixed point
    # z_q - dE/dp / kl_weight lies inside the simplex, so longer descent converges.
    kl_weight: float = 0.0
    # Amortised start: an LM head on the context stream proposes the candidates ("draft"),
    # trained with next-token cross-entropy (weight draft_loss_weight); in training the inner loop
    # starts from the detached draft plus noise. draft_layers: own residual SwiGLU blocks between
    # the shared stack and the head; draft_stop_gradient: its loss does not train the shared stack.
    draft_head: bool = False
    draft_layers: int = 0
    draft_loss_weight: float = 1.0
    draft_stop_gradient: bool = False
    # Energies that rank: cross-entropy over the energies of the true token's one-hot candidate
    # and contrastive_negatives wrong one-hots (half the model's own most likely wrong tokens, half
    # random), weighted by contrastive_weight, so confident wrong answers are pushed up. In the
    # joint mode the candidates are whole blocks: the truth against the model's own answer and
    # corrupted answers (positions given other positions' true tokens).
    contrastive_weight: float = 0.0
    contrastive_negatives: int = 8
    # Energies that verify: the energy of the final candidates regresses (squared error, weight
    # calibration_weight) onto their cross-entropy, so the raw energy estimates the loss of what
    # thinking settles on. Training otherwise uses only dE/dp and leaves the energy's per-context
    # offset free; this pins it. In principle it agrees with descent (an energy equal to the
    # expected cross-entropy is minimised by the true next-token distribution); measured on the
    # whole energy it costs perplexity, so the draft recipe fits only an offset (next field).
    calibration_weight: float = 0.0
    # With calibration_offset the energy gains a context-only term c(x) (a linear head on the
    # context stream's detached final features), E = g(x, p) + c(x), and the calibration loss fits
    # only c (to the cross-entropy minus the detached g): the energy's value becomes a loss
    # estimate while its gradient, all that thinking uses, is left exactly as training made it.
    calibration_offset: bool = False
    # Joint continuation (reasoning): 0 = autoregressive, one candidate per next token. m > 0 =
    # a block of m candidates after the prompt (the answer, then EOS padding), each attending to
    # the whole prompt and to every candidate of the block, refined together: one energy per
    # problem (the sum over the block). Training rows end with the block (data.answer_block).
    joint_block_size: int = 0
    # Where the block sits (RoPE positions). None: slot j right after the context, at (last context
    # position + 1 + j). An integer k: slot j at position k + j counted from the context's first
    # token whatever its length, so a slot's position says where it is in the answer, and which
    # prompt token sits beside it, not how far the prompt's end is (k = 1 puts sorting's answer
    # slot j beside prompt digit j and 6x6 Sudoku's answer cell j on puzzle cell j, both from 0).
    joint_block_start: int | None = None
    # Deep supervision: the inner loop runs train_segments times per batch, each segment starting
    # from the previous segment's detached final candidates, with a loss at every segment, so the
    # answer becomes an attractor that longer inference keeps (or reaches).
    train_segments: int = 1

    # What thinking callers get by default: one ``inference_<field>`` per ThinkingConfig field.
    inference_steps: int | None = None
    inference_step_size: float | None = None
    inference_step_size_schedule: str = "constant"
    inference_samples: int = 1
    inference_selection: str = "energy"
    inference_noise: float = 0.0
    inference_temperature: float = 1.0
    inference_tolerance: float | None = None
    inference_halting: str = "energy"
    inference_accept_decrease: bool = False
    inference_seed: int = 0
    inference_init: str = "noise"

    def __post_init__(self, **kwargs):
        self._validate_ebt()
        super().__post_init__(**kwargs)

    def _validate_ebt(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return _invalid("EBTConfig", name, getattr(self, name), allowed)

        positive_ints = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "train_steps",
        )
        for name in positive_ints:
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "must be an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise bad("hidden_size", "the head size (hidden_size / heads) must be even for RoPE")
        choices = {"update_rule": UPDATE_RULES, "second_order": SECOND_ORDER, "loss_on": LOSS_ON}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"allowed values are {', '.join(allowed)}")
        for name in ("step_size", "step_size_lr_multiplier", "rope_theta"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "must be a finite number > 0")
        for name in (
            "langevin_noise",
            "init_noise_scale",
            "rms_norm_eps",
            "initializer_range",
            "kl_weight",
            "draft_loss_weight",
            "contrastive_weight",
            "calibration_weight",
        ):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "must be a finite number >= 0")
        if not (_is_number(self.step_size_random_scale) and self.step_size_random_scale >= 1):
            raise bad(
                "step_size_random_scale",
                "must be a finite number >= 1 (1 = fixed; s draws alpha uniformly in [alpha/s, alpha*s])",
            )
        if self.train_steps_max is not None and not (
            _is_int(self.train_steps_max) and self.train_steps_max >= self.train_steps
        ):
            raise bad("train_steps_max", f"must be None or an integer >= train_steps={self.train_steps}")
        if not (_is_int(self.draft_layers) and self.draft_layers >= 0):
            raise bad("draft_layers", "must be an integer >= 0")
        if not (_is_int(self.train_segments) and self.train_segments >= 1):
            raise bad("train_segments", "must be an integer >= 1")
        if not (_is_int(self.joint_block_size) and 0 <= self.joint_block_size < self.max_position_embeddings):
            raise bad(
                "joint_block_size",
                f"must be 0 (autoregressive) or an integer in [1, max_position_embeddings={self.max_position_embeddings})",
            )
        if self.joint_block_start is not None and not (
            self.joint_block_size
            and _is_int(self.joint_block_start)
            and 0 <= self.joint_block_start <= self.max_position_embeddings - self.joint_block_size
        ):
            raise bad(
                "joint_block_start",
                "must be None (the block after the context) or, in the joint mode (joint_block_size > 0), an integer "
                f"in [0, max_position_embeddings - joint_block_size = {self.max_position_embeddings - self.joint_block_size}]",
            )
        if self.joint_block_size and self.draft_head:
            raise bad("joint_block_size", "the joint mode has no draft head: set draft_head=False")
        if self.calibration_offset and (self.joint_block_size or self.calibration_weight <= 0):
            raise bad(
                "calibration_offset",
                "needs the autoregressive mode (joint_block_size=0) and calibration_weight > 0 (what trains the offset)",
            )
        if self.contrastive_weight > 0 and not (
            _is_int(self.contrastive_negatives)
            and 1 <= self.contrastive_negatives
            and (self.joint_block_size or self.contrastive_negatives < self.vocab_size)
        ):
            per_token = f"an integer in [1, vocab_size={self.vocab_size})"
            allowed = "an integer >= 1 (whole answers)" if self.joint_block_size else per_token
            raise bad("contrastive_negatives", f"must be {allowed}")
        if self.kl_weight > 0:
            if self.update_rule != "mirror":
                raise bad("kl_weight", "needs update_rule='mirror' (the damped mirror step)")
            largest = self.step_size * self.step_size_random_scale * self.kl_weight
            if largest >= 1:
                raise bad(
                    "kl_weight",
                    f"step_size x step_size_random_scale x kl_weight = {largest:g} must stay below 1 "
                    "(the step multiplies z by 1 - alpha * kl_weight)",
                )
        if self.inference_init == "draft" and not self.draft_head:
            raise bad("inference_init", "'draft' needs draft_head=True")
        try:
            ThinkingConfig.from_model_config(self)  # the inference defaults obey ThinkingConfig's rules
        except ValueError as err:
            raise ValueError(str(err).replace("ThinkingConfig.", "EBTConfig.inference_")) from None
        if self.inference_samples is None or self.inference_seed is None:
            raise bad("inference_samples" if self.inference_samples is None else "inference_seed", "must be set")

    @property
    def max_train_steps(self) -> int:
        """The largest step count training uses (also the number of step embeddings)."""
        return self.train_steps_max if self.train_steps_max is not None else self.train_steps

    @property
    def trained_steps(self) -> int:
        """The longest descent a training trajectory makes: the largest step count times the
        segments (deep supervision continues one trajectory), thinking's default ``steps``."""
        return self.max_train_steps * self.train_segments

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def thinking_config(self) -> ThinkingConfig:
        """The checkpoint's default thinking, every field resolved (see ``ThinkingConfig.resolve``)."""
        return ThinkingConfig().resolve(self)

    @thinking_config.setter
    def thinking_config(self, thinking: ThinkingConfig) -> None:
        """Make ``thinking``'s set fields the checkpoint's defaults (saved by ``save_pretrained``)."""
        for name, value in thinking.to_dict().items():
            if value is not None:
                setattr(self, f"inference_{name}", value)
        self._validate_ebt()


__all__ = ["EBTConfig", "ThinkingConfig"]
