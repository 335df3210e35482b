"""``python -m eval bench`` (issue 6): it runs end to end at the smallest size, its FLOP model
matches what torch counts on the real passes, and its CPU memory measure sees allocations.
No timing is asserted: timings depend on the machine and its load."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM

from ebt import EBTForCausalLM, ThinkingConfig, llama_twin_config
from ebt.reference import plain_forward
from eval.__main__ import main as eval_main
from eval.bench import BENCH_RECIPES, SIZES, ebt_config, interleaved, peak_memory
from eval.flops import Dims, Recipe, ebt_decode_flops, train_step_flops

aten = torch.ops.aten


def _flash_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """The CPU fused attention, which FlopCounterMode does not count: causal skips the masked half."""
    b, h, lq, dh = q
    pairs = lq * (lq + 1) // 2 if is_causal else lq * k[2]
    return 4 * b * h * dh * pairs


def _flash_backward_flops(
    grad_out, q, k, v, out, logsumexp, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs
) -> int:
    return 2 * _flash_flops(q, k, v, dropout_p, is_causal)


FLASH = {
    aten._scaled_dot_product_flash_attention_for_cpu: _flash_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_backward_flops,
}


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=FLASH)
    with counter:
        fn()
    return counter.get_total_flops()


def test_bench_runs_at_the_smallest_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--sizes",
        "micro",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--think-steps",
        "1",
        "2",
        "--think-samples",
        "2",
        "--uncached-steps",
        "1",
        "--new-tokens",
        "2",
        "--threads",
        "1",
        "--output",
        str(out),
    ]
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Transformer++ |" in printed and "Context reuse" in printed and "uncached / cached" in printed
    assert "Targets" not in printed  # targets live in docs/bench.md; the command only measures

    report = json.loads(out.read_text())
    assert report["machine"]["torch_threads"] == 1
    training = report["sizes"]["micro"]["training"]["rows"]
    assert [r["name"] for r in training] == ["Transformer++", "EBT S1", "EBT S1 plain", "EBT S2", "EBT S2 plain"]
    for row in training:
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_bytes"] > 0 and row["flops_per_token"] > 0
    (ctx,) = report["sizes"]["micro"]["generation"]["contexts"]
    assert [r["name"] for r in ctx["rows"]] == ["llama", "cached k=1", "cached k=2", "uncached k=1"]
    assert [r["think_samples"] for r in ctx["rows"]] == [None, 2, 2, 2]  # --think-samples reaches every EBT row
    assert all(r["first_token_s"] > 0 for r in ctx["rows"])
    assert "targets" not in report


def test_bench_recipes_are_the_projects_s2_at_its_dearer_step_count():
    from ebt.recipes import RECIPES

    assert BENCH_RECIPES["S1"] == RECIPES["s1"]
    assert BENCH_RECIPES["S2"] == {**RECIPES["s2"], "train_steps": 3, "train_steps_max": None}


@pytest.mark.parametrize("recipe", sorted(BENCH_RECIPES))
def test_flop_model_matches_counted_training_flops(recipe):
    torch.manual_seed(0)
    size = SIZES["micro"]
    ebt = EBTForCausalLM(ebt_config(size, recipe, size.context)).train()
    llama = LlamaForCausalLM(llama_twin_config(ebt.config)).train()
    ids = torch.randint(size.vocab, (size.batch, size.context))
    counted = {
        "llama": _counted(lambda: llama(input_ids=ids, labels=ids).loss.backward()),
        "ebt": _counted(lambda: ebt(input_ids=ids, labels=ids).loss.backward()),
        "plain": _counted(lambda: plain_forward(ebt, ids, ids).loss.backward()),
    }
    model = train_step_flops(Dims.of(ebt.config), size.context, Recipe.of(ebt.config))
    for name, flops in counted.items():
        assert model[name] * ids.numel() == pytest.approx(flops, rel=0.02), name


@pytest.mark.parametrize(
    ("cached", "samples", "energies"), [(True, 1, False), (False, 1, False), (True, 2, False), (True, 1, True)]
)
def test_flop_model_matches_counted_decoding_flops(cached, samples, energies):
    torch.manual_seed(0)
    size = SIZES["micro"]
    ebt = EBTForCausalLM(ebt_config(size, "S1", 32)).eval()
    prompt = torch.randint(size.vocab, (1, 10))
    thinking = ThinkingConfig(steps=3, samples=samples)

    def generate(n: int):
        return lambda: ebt.generate(
            prompt, max_new_tokens=n, thinking=thinking, use_cache=cached, return_dict_in_generate=energies
        )

    second_token = _counted(generate(2)) - _counted(generate(1))  # decoding at context 10 -> 11
    assert ebt_decode_flops(Dims.of(ebt.config), 10, 3, cached, samples, energies) == pytest.approx(second_token, rel=0.02)


def test_cpu_peak_memory_sees_the_largest_moment():
    def fn():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        return (b + 1).sum()  # 8000 live again, never more

    peak = peak_memory(fn, torch.device("cpu"))
    assert 8000 <= peak < 8200


def test_interleaved_calls_every_candidate_every_round_in_rotating_order():
    calls = []

    def record(name: str):
        return lambda: calls.append(name) or len(calls)

    results = interleaved({"a": record("a"), "b": record("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order rotates every round
    assert results == {"a": [4, 5, 8], "b": [3, 6, 7]}  # warm-up results dropped
