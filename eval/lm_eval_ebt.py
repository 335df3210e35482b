"""The ``ebt`` model of lm-evaluation-harness: the ``hf`` model plus thinking settings as model args.

Importing this module registers it (lm-eval has no plugin discovery for models, so
``python -m eval harness`` imports it before evaluating; from Python, ``import
eval.lm_eval_ebt`` then ``lm_eval.simple_evaluate(model="ebt", ...)``). Every ``ThinkingConfig``
field is a model arg named ``think_<field>``, as in ``forward`` and ``generate``::

    model_args="pretrained=DIR,think_steps=4,think_samples=2,think_noise=0.5,think_step_size_schedule=cosine"

Why a subclass of lm-eval's ``HFLM`` rather than a new ``LM``: an EBT checkpoint is a plain causal
LM to every Hugging Face client (``model(ids).logits[:, r]`` predicts token r+1, ``generate()``),
so the ``hf`` model already scores it correctly, batched, with lm-eval's own tokenisation,
truncation, rolling windows and stop sequences. What ``hf`` cannot do is choose how the model
thinks: it always gets the checkpoint's defaults (``config.inference_*``, generation config
``think_*``). This class builds one ``ThinkingConfig`` from its model args and passes it as
``thinking=`` to every forward and ``generate`` call, and changes nothing else, so at equal
settings it returns exactly what ``hf`` returns.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import ebt  # noqa: F401  (registers the "ebt" model type with the Auto classes: no remote code needed)
from ebt.configuration_ebt import ThinkingConfig
from eval.common import given_settings, thinking_value


@register_model("ebt")
class EBTLM(HFLM):
    """lm-eval's ``hf`` model with a ``thinking`` config: ``thinking=ThinkingConfig(...)`` from
    Python, or ``think_<field>`` model args for any ``ThinkingConfig`` field (text values, as
    lm-eval's command line gives them, are converted and validated). A field left unset keeps
    the checkpoint's default."""

    def __init__(self, pretrained: str, thinking: ThinkingConfig | None = None, **kwargs: Any) -> None:
        settings = ThinkingConfig.pop_prefixed(kwargs)
        stray = sorted(k for k in kwargs if k.startswith("think_"))
        if stray:
            raise ValueError(
                f"unknown thinking setting(s) {stray}; valid: think_{', think_'.join(ThinkingConfig.field_names())}."
            )
        self.thinking = (thinking or ThinkingConfig()).merged(
            {name: thinking_value(name, value) for name, value in settings.items() if value is not None}
        )
        kwargs.setdefault("backend", "causal")  # lm-eval cannot tell from a model type it does not know
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")  # hf's default is always cuda
        super().__init__(pretrained, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Logits (B, L, V) of a right-padded batch; padding follows the scored tokens, so it cannot affect them.

        A joint-mode EBT has no next-token logits (it scores whole answer blocks), so log-likelihood
        requests are refused rather than answered with misaligned numbers."""
        if getattr(self.model.config, "joint_block_size", 0):
            raise ValueError(
                f"{self.model.config.name_or_path or 'this checkpoint'} is a joint-mode EBT (joint_block_size="
                f"{self.model.config.joint_block_size}): it refines a whole answer block, not next tokens, so "
                "log-likelihood tasks (ebt_*_mc, ebt_text_ppl) do not apply; evaluate it on the generative tasks "
                "(tag ebt_reasoning) or with python -m eval reasoning."
            )
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None
            ),
        ):
            return self.model(inps, thinking=self.thinking).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        return super()._model_generate(context, max_length, stop, **generation_kwargs, thinking=self.thinking)

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the thinking settings given, so saved results say how the model thought."""
        return super().get_model_info() | {"thinking": given_settings(self.thinking)}
