"""KV-cached generation (issue 4): cached == uncached, greedy == argmax of think() on the prefix,
left-padded batches, EOS, streaming, per-token energies, sampling controls, pipelines and remote
code, and clear errors for invalid settings."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_ebt_config
from transformers import GenerationConfig, TextStreamer

from ebt import EBTForCausalLM
from train.tokenizer import char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
# (generate kwargs, the same settings as think() kwargs)
SETTINGS = {
    "1 step": ({"think_steps": 1}, {"steps": 1}),
    "3 steps, best of 2": ({"think_steps": 3, "think_samples": 2}, {"steps": 3, "samples": 2}),
    "adaptive + accept": (
        {"think_steps": 4, "think_tolerance": 1e-3, "think_accept_decrease": True},
        {"steps": 4, "tolerance": 1e-3, "accept_decrease": True},
    ),
    "Langevin, own seed": (
        {"think_steps": 2, "think_noise": 1.0, "think_temperature": 0.5, "think_seed": 7},
        {"steps": 2, "noise": 1.0, "temperature": 0.5, "seed": 7},
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer([ALPHABET])


@pytest.fixture(scope="module")
def model(tokenizer) -> EBTForCausalLM:
    """Random weights with a wide init: its greedy continuations vary (the default init repeats one token)."""
    torch.manual_seed(0)
    config = tiny_ebt_config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, max_position_embeddings=96, initializer_range=0.5
    )
    return EBTForCausalLM(config).eval()


def _prompt(n: int = 8, seed: int = 0, batch: int = 2, vocab: int = 32) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_cached_generation_equals_uncached_over_64_tokens(model, setting):
    gen_kwargs, _ = SETTINGS[setting]
    prompt = _prompt()
    cached = model.generate(prompt, max_new_tokens=64, **gen_kwargs)
    uncached = model.generate(prompt, max_new_tokens=64, use_cache=False, **gen_kwargs)
    assert cached.shape == (2, 8 + 64)
    assert len(set(cached[:, 8:].flatten().tolist())) >= 8, "degenerate model: the comparison would prove nothing"
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_token_is_argmax_of_think_on_the_same_prefix(model, setting):
    gen_kwargs, think_kwargs = SETTINGS[setting]
    prompt = _prompt(seed=1)
    out = model.generate(prompt, max_new_tokens=24, **gen_kwargs)
    with torch.no_grad():
        for t in range(8, out.shape[1]):
            thought = model.think(out[:, :t], **think_kwargs)
            assert torch.equal(thought.logits[:, -1].argmax(-1), out[:, t]), f"position {t}"


def test_use_cache_false_recomputes_the_prefix_and_the_cache_appends(model, monkeypatch):
    calls = []
    encode = model.model.encode

    def spy(ids, attention_mask=None, past=None):
        calls.append((ids.shape[1], past is not None))
        return encode(ids, attention_mask, past=past)

    monkeypatch.setattr(model.model, "encode", spy)
    model.generate(_prompt(), max_new_tokens=5)
    assert calls == [(8, False)] + [(1, True)] * 4
    calls.clear()
    model.generate(_prompt(), max_new_tokens=5, use_cache=False)
    assert calls == [(8 + i, False) for i in range(5)]


def test_left_padded_batch_matches_each_prompt_alone(model, tokenizer):
    short, long = _prompt(5, seed=2, batch=1)[0], _prompt(9, seed=3, batch=1)[0]
    pad = tokenizer.pad_token_id
    batch = torch.stack((torch.cat((torch.full((4,), pad), short)), long))
    mask = torch.stack((torch.cat((torch.zeros(4), torch.ones(5))), torch.ones(9))).long()
    kwargs = {"max_new_tokens": 20, "think_steps": 2, "think_samples": 2}
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone_short = model.generate(short[None], **kwargs)
    alone_long = model.generate(long[None], **kwargs)
    assert torch.equal(together[0, 9:], alone_short[0, 5:])
    assert torch.equal(together[1, 9:], alone_long[0, 9:])


def test_eos_stops_a_sequence_pads_it_and_ends_when_all_are_done(model):
    prompt = _prompt(seed=4)
    free = model.generate(prompt, max_new_tokens=12)
    eos = int(free[0, 8 + 3])  # row 0 produces this token at its 4th new position
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    row0 = out.sequences[0, 8:]
    stop = int((row0 == eos).nonzero()[0])
    assert stop <= 3
    assert (row0[stop + 1 :] == 0).all()
    assert torch.isnan(out.energies[0, stop + 1 :]).all() and not torch.isnan(out.energies[0, : stop + 1]).any()
    both_stop = model.generate(prompt[:1], max_new_tokens=12, eos_token_id=eos)
    assert both_stop.shape[1] == 8 + stop + 1


def test_streamer_gets_the_prompt_then_every_new_token_then_end(model, tokenizer, capsys):
    prompt = tokenizer("to be or not", return_tensors="pt").input_ids

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    collect = Collect()
    out = model.generate(prompt, max_new_tokens=6, streamer=collect)
    assert collect.ended and torch.equal(collect.puts[0], prompt)
    assert torch.equal(torch.cat([p.reshape(-1) for p in collect.puts[1:]]), out[0, prompt.shape[1] :])

    model.generate(prompt, max_new_tokens=6, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out[0, prompt.shape[1] :]).rstrip("\n")


def test_per_token_energies_come_back_with_the_tokens(model):
    # float64: best-of-2 picks between near-equal energies, which float32 rounding could flip
    model = copy.deepcopy(model).double()
    prompt = _prompt(seed=5)
    out = model.generate(
        prompt,
        max_new_tokens=6,
        think_steps=3,
        think_samples=2,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert out.energies.shape == out.steps_taken.shape == (2, 6)
    assert out.function_evaluations == 2 * (2 * 3 + 1)
    assert len(out.scores) == len(out.logits) == 6 and out.scores[0].shape == (2, model.config.vocab_size)
    with torch.no_grad():
        for i in range(6):
            thought = model.think(out.sequences[:, : 8 + i], steps=3, samples=2)
            torch.testing.assert_close(out.energies[:, i], thought.energies[:, -1, -1])
            torch.testing.assert_close(out.logits[i], thought.logits[:, -1])
    assert (out.steps_taken == 3).all()


def test_energy_pass_is_skipped_only_when_nobody_reads_it(model):
    """Plain generate() skips the final energy pass; asking for energies gives the same tokens plus
    the final energies of think() on each prefix."""
    prompt = _prompt(seed=8)
    plain = model.generate(prompt, max_new_tokens=5, think_steps=2)
    out = model.generate(prompt, max_new_tokens=5, think_steps=2, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain) and out.function_evaluations == 2 * 2 + 1
    with torch.no_grad():
        thought = model.think(out.sequences[:, :-1], steps=2)
        skipped = model.think(out.sequences[:, :-1], steps=2, final_energy=False)
    torch.testing.assert_close(out.energies[:, -1], thought.energies[:, -1, -1])
    assert torch.equal(skipped.logits, thought.logits) and skipped.energies.shape[-1] == 2
    assert skipped.function_evaluations == 2 * 2


@pytest.mark.slow
def test_compiled_thinking_equals_eager(model, tmp_path, monkeypatch):
    """compile_thinking() (torch.compile, dynamic shapes) changes speed, not results: greedy
    generation picks the same tokens with the same per-token energies, to float64 rounding.

    A fresh inductor cache: torch's cache key ignores ATEN_CPU_CAPABILITY, and kernels cached by a
    run with other CPU kernels fail to build (seen when the suite runs again under 'default')."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = copy.deepcopy(model).double()
    compiled = copy.deepcopy(model).double()
    compiled.compile_thinking()
    kwargs = {"max_new_tokens": 6, "think_steps": 2, "think_samples": 2, "return_dict_in_generate": True}
    a, b = eager.generate(_prompt(seed=9), **kwargs), compiled.generate(_prompt(seed=9), **kwargs)
    assert torch.equal(b.sequences, a.sequences)
    # float64 through a few hundred fused or reordered operations: differences ~1e-14
    torch.testing.assert_close(b.energies, a.energies, rtol=1e-9, atol=1e-9)


def test_sampling_controls(model):
    prompt = _prompt(seed=6)
    greedy = model.generate(prompt, max_new_tokens=16)
    # top_p this small keeps only the most likely token: sampling collapses to greedy.
    assert torch.equal(model.generate(prompt, max_new_tokens=16, do_sample=True, top_p=1e-9), greedy)
    torch.manual_seed(0)
    hot = model.generate(prompt, max_new_tokens=16, do_sample=True, temperature=5.0, top_k=0)
    torch.manual_seed(0)
    again = model.generate(prompt, max_new_tokens=16, do_sample=True, temperature=5.0, top_k=0)
    assert torch.equal(hot, again) and not torch.equal(hot, greedy)


def test_generation_config_and_kwargs(model):
    prompt = _prompt(seed=7)
    config = GenerationConfig(max_new_tokens=5, think_steps=3)
    from_config = model.generate(prompt, generation_config=config)
    assert torch.equal(from_config, model.generate(prompt, max_new_tokens=5, think_steps=3))
    overridden = model.generate(prompt, generation_config=config, max_new_tokens=7, think_steps=1)
    assert torch.equal(overridden, model.generate(prompt, max_new_tokens=7, think_steps=1))
    # num_return_sequences repeats each prompt (sampling only, as in transformers); top_p ~ 0 is greedy.
    repeated = model.generate(prompt, max_new_tokens=5, num_return_sequences=2, do_sample=True, top_p=1e-9)
    assert torch.equal(repeated[::2], repeated[1::2]) and torch.equal(repeated[::2], model.generate(prompt, max_new_tokens=5))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"think_steps": -1}, ValueError, "ThinkingConfig.steps"),
        ({"think_samples": 0}, ValueError, "ThinkingConfig.samples"),
        ({"think_step_size": -1.0}, ValueError, "ThinkingConfig.step_size"),
        ({"think_temperature": -1.0}, ValueError, "ThinkingConfig.temperature"),
        ({"think_noise": float("inf")}, ValueError, "ThinkingConfig.noise"),
        ({"thinking": {"stepz": 1}}, ValueError, "unknown thinking setting"),
        ({"num_beams": 2}, ValueError, "does not support"),
        ({"max_new_tokens": 90}, ValueError, "exceeds the model's context"),
        ({"not_an_option": 1}, TypeError, "not_an_option"),
    ],
)
def test_invalid_settings_fail_clearly(model, kwargs, error, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        model.generate(_prompt(), **kwargs)


def test_prompt_longer_than_the_context_fails_clearly(model):
    with pytest.raises(ValueError, match="prompt has 97 tokens.*max_position_embeddings=96"):
        model.generate(_prompt(97, batch=1), max_new_tokens=1)


def test_pipeline_with_remote_code_where_ebt_is_not_imported(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "generation_ebt.py").is_file()
    ids = tokenizer("to be or not", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=12, think_steps=2)[0])
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import pipeline
        pipe = pipeline("text-generation", model={str(tmp_path)!r}, trust_remote_code=True)
        assert "ebt" not in sys.modules, "the test must exercise the checkpoint's own code"
        print(type(pipe.model).__module__)
        out = pipe("to be or not", max_new_tokens=12, do_sample=False, think_steps=2)
        print(repr(out[0]["generated_text"]))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    module, text = run.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules")
    assert text == repr(expected)


def test_stopping_criteria_end_each_sequence_on_its_own():
    """lm-eval's hf model passes stop sequences as stopping_criteria; each row stops when told."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtLength(StoppingCriteria):
        def __init__(self, lengths: torch.Tensor):
            self.lengths = lengths

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            return input_ids.shape[1] >= self.lengths

    torch.manual_seed(0)
    model = EBTForCausalLM(tiny_ebt_config(intermediate_size=16, num_hidden_layers=1, step_size=500.0)).eval()
    prompt = torch.randint(1, 11, (2, 3))
    free = model.generate(prompt, max_new_tokens=8, pad_token_id=0)
    stopped = model.generate(
        prompt, max_new_tokens=8, pad_token_id=0, stopping_criteria=StoppingCriteriaList([StopAtLength(torch.tensor([5, 7]))])
    )
    assert stopped.shape[1] == 7  # the longest row decides the length
    assert torch.equal(stopped[0, :5], free[0, :5]) and (stopped[0, 5:] == 0).all()
    assert torch.equal(stopped[1], free[1, :7])
