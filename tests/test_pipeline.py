"""``transformers.pipeline("text-generation")`` on the trainer's exported ``final/`` folder (issue 7):
the folder's own tokenizer and generation config, no EBT-specific handling. (Where ``ebt`` is
imported, transformers prefers the registered class to the folder's copy of the code; the copy
is exercised where ``ebt`` is not imported: the lm-eval command in test_harness.py and the
remote-code pipeline test in test_generation.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TRAIN_OVERRIDES, train_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

PROMPTS = ["12+34=", "5+6=", "907+3="]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``OUTPUT/final`` of a two-step run of the project's trainer (weights barely trained: generation only)."""
    tiny = [
        *TRAIN_OVERRIDES, "data.tasks=[addition]", "data.task_examples=100", "train.max_steps=2", "train.warmup_steps=1",
        "eval.every=1000", "eval.max_blocks=1", "eval.think_steps=[1]", "checkpoint.every=1000",
    ]  # fmt: skip
    return train_tiny_run(tmp_path_factory.mktemp("run"), *tiny)


@pytest.fixture(scope="module")
def pipe(exported):
    return pipeline("text-generation", model=str(exported), trust_remote_code=True, device="cpu")


def _greedy(exported: Path, prompt: str, **kwargs) -> str:
    """What the model's own ``generate`` gives for one prompt alone, decoded as the pipeline decodes."""
    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return prompt + tokenizer.decode(model.generate(ids, **kwargs)[0, ids.shape[1] :], skip_special_tokens=True)


def test_pipeline_passes_thinking_settings_to_generate(pipe, exported):
    texts = {}
    for steps in (1, 4):
        texts[steps] = pipe(PROMPTS[0], max_new_tokens=8, do_sample=False, think_steps=steps)[0]["generated_text"]
        assert texts[steps] == _greedy(exported, PROMPTS[0], max_new_tokens=8, think_steps=steps)
    assert texts[1] != texts[4], "thinking longer changed nothing: the check above proves nothing"


def test_batched_pipeline_equals_each_prompt_alone(pipe, exported):
    batched = pipe(PROMPTS, max_new_tokens=8, do_sample=False, batch_size=len(PROMPTS))
    assert [o[0]["generated_text"] for o in batched] == [_greedy(exported, p, max_new_tokens=8) for p in PROMPTS]
    assert any(o[0]["generated_text"] != p for o, p in zip(batched, PROMPTS)), (
        "nothing generated: the comparison proves nothing"
    )


def test_pipeline_generates_with_the_folders_defaults(pipe, exported):
    """The plain call: the pipeline's own defaults (it samples, temperature 0.7) and the folder's
    generation_config (a length limit that fits the context), no argument of ours."""
    import json

    saved = json.loads((exported / "generation_config.json").read_text())
    assert saved.get("max_length") == 32 and "max_new_tokens" not in saved
    out = pipe(PROMPTS[1])[0]["generated_text"]
    assert out.startswith(PROMPTS[1]) and len(out) > len(PROMPTS[1])
