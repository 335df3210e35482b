"""ebt: energy-based transformers as Hugging Face causal LMs.

Importing the package registers the ``ebt`` model type with ``AutoConfig`` and
``AutoModelForCausalLM``; saved checkpoints also carry their own code (``trust_remote_code``).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_ebt import EBTConfig, ThinkingConfig
from .modeling_ebt import (
    EBTCausalLMOutput,
    EBTContext,
    EBTForCausalLM,
    EBTModel,
    EBTPreTrainedModel,
    EBTThinkOutput,
)
from .recipes import RECIPES, recipe
from .twin import llama_twin_config

AutoConfig.register("ebt", EBTConfig, exist_ok=True)
AutoModelForCausalLM.register(EBTConfig, EBTForCausalLM, exist_ok=True)
# save_pretrained copies configuration_ebt.py / modeling_ebt.py next to the weights and writes
# auto_map, so a checkpoint loads with trust_remote_code=True where ebt is not installed.
EBTConfig.register_for_auto_class()
EBTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "EBTCausalLMOutput",
    "EBTConfig",
    "EBTContext",
    "EBTForCausalLM",
    "EBTModel",
    "EBTPreTrainedModel",
    "EBTThinkOutput",
    "RECIPES",
    "ThinkingConfig",
    "llama_twin_config",
    "recipe",
]
