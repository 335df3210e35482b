"""``OUTPUT/final/``: a Hub-style model folder (config, safetensors, tokenizer, generation config, card).

Written to ``final.tmp`` and renamed when complete, like checkpoints; optionally pushed to the Hub.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from train.config import RunConfig, dump_yaml

TITLES = {"ebt": "Energy-based transformer (EBT)", "llama": "Transformer++ (Llama) twin of an EBT"}  # by model.kind


def _data_line(cfg: RunConfig) -> str:
    d = cfg.data
    if d.source == "tasks":
        return f"the embedded reasoning tasks ({', '.join(d.tasks)}; answers scored, prompts not)"
    return f"`{d.source}`" + (f" ({d.hub_config})" if d.hub_config else "")


def model_card(
    model: PreTrainedModel, cfg: RunConfig, tokens: int, steps: int, metrics: dict[str, float], params: int | None = None
) -> str:
    kind = TITLES.get(cfg.model.kind, type(model).__name__)
    params = sum(p.numel() for p in model.parameters()) if params is None else params
    results = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if k.startswith("val/"))
    package = type(model).__module__.split(".")[0]
    custom = package != "transformers"  # model code outside transformers: import it, or trust the folder's copy
    imports = f"import {package}  # registers the model with the Auto classes\n" if custom else ""
    remote = (
        f"\nWithout the `{package}` package, add `trust_remote_code=True` (the model code ships in this folder).\n"
        if custom
        else ""
    )
    return f"""---
library_name: transformers
license: apache-2.0
tags: [ebt, energy-based-transformer, causal-lm]
---

# {kind}

{params:,} parameters: {cfg.model.num_hidden_layers} layers, width {cfg.model.hidden_size},
{cfg.model.num_attention_heads} heads, context {cfg.model.max_position_embeddings}, vocabulary {model.config.vocab_size}.

- Data: {_data_line(cfg)}, blocks of {cfg.data.block_size} tokens
- Tokenizer: {cfg.tokenizer.kind}{f" ({cfg.tokenizer.name_or_path})" if cfg.tokenizer.name_or_path else ""}
- Training: {steps} steps, {tokens:,} tokens seen, peak lr {cfg.train.lr}

## Final validation metrics

| metric | value |
| --- | --- |
{results}

(`val/loss_thinkK`: loss after K thinking steps; losses in nats per token.)

## How to load

```python
{imports}from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
```
{remote}
## Training config

Reproduce with `python -m train run_config.yaml` (the file is in this folder).

```yaml
{dump_yaml(cfg)}```
"""


def export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    cfg: RunConfig,
    tokens: int,
    steps: int,
    metrics: dict[str, float],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out/final`` (main process only) and push it when ``hub.push_to_hub``.

    ``weights``: the full weights when ``model`` holds only its shard (FSDP; gathered by every process)."""
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    params = None
    if weights is None:
        model.save_pretrained(str(tmp))
    else:
        model.save_pretrained(str(tmp), state_dict={k: v.cpu() for k, v in weights.items()})
        names = {n for n, _ in model.named_parameters()}
        params = sum(v.numel() for k, v in weights.items() if k in names)
    tokenizer.save_pretrained(str(tmp))
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        # A length limit, not a number of new tokens: prompt + new tokens must fit the context,
        # and clients (pipelines, lm-eval) pass their own max_new_tokens / max_length.
        max_length=model.config.max_position_embeddings,
    ).save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(model, cfg, tokens, steps, metrics, params))
    (tmp / "run_config.yaml").write_text(dump_yaml(cfg))
    if final.exists():  # this run's own earlier export (the run folder holds one run only)
        shutil.rmtree(final)
    tmp.rename(final)
    if cfg.hub.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(cfg.hub.repo_id, private=cfg.hub.private, exist_ok=True)
        api.upload_folder(repo_id=cfg.hub.repo_id, folder_path=str(final), commit_message=f"{steps} steps, {tokens} tokens")
    return final
