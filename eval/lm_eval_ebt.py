"""The ``ebt`` model of lm-evaluation-harness: the ``hf`` model plus thinking settings as model args.

Importing this module registers it (lm-eval has no plugin discovery for models, so
``python -m eval harness`` imports it before evaluating; from Python, ``import
eval.lm_eval_ebt`` then ``lm_eval.simple_evaluate(model="ebt", ...)``)::

    model_args="pretrained=DIR,think_steps=4,think_samples=2,think_tolerance=0.001,think_seed=0"

Why a subclass of lm-eval's ``HFLM`` rather than a new ``LM``: an EBT checkpoint is a plain causal
LM to every Hugging Face client (``model(ids).logits[:, r]`` predicts token r+1, ``generate()``),
so the ``hf`` model already scores it correctly, batched, with lm-eval's own tokenisation,
truncation, rolling windows and stop sequences. What ``hf`` cannot do is choose how the model
thinks: it always gets the checkpoint's defaults (``config.inference_*``, generation config
``think_*``). This class passes explicit settings to every forward and ``generate`` call and
changes nothing else, so at equal settings it returns exactly what ``hf`` returns.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import ebt  # noqa: F401  (registers the "ebt" model type with the Auto classes: no remote code needed)


@register_model("ebt")
class EBTLM(HFLM):
    """lm-eval's ``hf`` model with ``think_steps``, ``think_samples``, ``think_tolerance`` and
    ``think_seed``; each left unset (None) keeps the checkpoint's default."""

    def __init__(
        self,
        pretrained: str,
        think_steps: int | None = None,
        think_samples: int | None = None,
        think_tolerance: float | None = None,
        think_seed: int | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("backend", "causal")  # lm-eval cannot tell from a model type it does not know
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")  # hf's default is always cuda
        super().__init__(pretrained, **kwargs)
        self.think = {
            "think_steps": think_steps,
            "think_samples": think_samples,
            "think_tolerance": think_tolerance,
            "think_seed": think_seed,
        }

    def set_thinking(self, **think: int | float | None) -> None:
        """Change the thinking settings (``think_steps=...``) between evaluations of one loaded model."""
        unknown = set(think) - set(self.think)
        if unknown:
            raise ValueError(f"unknown thinking settings {sorted(unknown)}; known: {sorted(self.think)}")
        self.think.update(think)

    def _given(self) -> dict[str, int | float]:
        return {k: v for k, v in self.think.items() if v is not None}

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Logits (B, L, V) of a right-padded batch; padding follows the scored tokens, so it cannot affect them."""
        forward = {("seed" if k == "think_seed" else k): v for k, v in self._given().items()}
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type, dtype=self.mixed_precision_dtype, enabled=self.mixed_precision_dtype is not None
        ):
            return self.model(inps, **forward).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        return super()._model_generate(context, max_length, stop, **generation_kwargs, **self._given())

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the thinking settings, so saved results say how the model thought."""
        return super().get_model_info() | {"think": dict(self.think)}
