"""One ``ThinkingConfig``, every entry point (issue 10): ``think()``, ``forward`` (eval mode),
``generate`` (keyword and ``GenerationConfig``), the lm-eval ``ebt`` model and ``python -m eval
thinking`` give the same tokens and log-likelihoods. Also: ``ThinkingConfig`` refuses every bad
value naming the field, and every ``python -m eval`` command has a flag for every field."""

from __future__ import annotations

import argparse
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT32_EPS, assert_no_near_ties, loglik_tolerance, save_checkpoint, tiny_ebt_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ebt import EBTForCausalLM, ThinkingConfig
from eval.__main__ import COMMANDS
from eval.__main__ import main as eval_main
from eval.common import thinking_fields, thinking_settings
from train.tokenizer import char_tokenizer

# Not the checkpoint's defaults in any field it sets: 3 steps (trained: 2), best of 2 seeded starts,
# Langevin noise, a decaying step size, a seed of its own.
THINKING = ThinkingConfig(steps=3, samples=2, noise=0.5, seed=5, step_size_schedule="cosine")
AS_FLAGS = ["--steps", "3", "--think-samples", "2", "--noise", "0.5", "--think-seed", "5", "--step-size-schedule", "cosine"]
AS_NAMES = {"steps": 3, "samples": 2, "noise": 0.5, "seed": 5, "step_size_schedule": "cosine"}
ALPHABET = "abcdefgh \n"
CONTEXT = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random tiny EBT (float32) with a character tokenizer, saved as a checkpoint, and a text file."""
    root = tmp_path_factory.mktemp("thinking_config")
    tokenizer = char_tokenizer([ALPHABET], eos_token="\n")
    torch.manual_seed(0)
    config = tiny_ebt_config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, max_position_embeddings=CONTEXT,
        initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    save_checkpoint(root / "ebt", EBTForCausalLM(config).eval(), tokenizer)
    gen = torch.Generator().manual_seed(0)
    text = "".join(ALPHABET[i] for i in torch.randint(len(ALPHABET) - 1, (6 * CONTEXT,), generator=gen).tolist())
    (root / "text.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder / "ebt", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder / "ebt")


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _think(model, ids: torch.Tensor):
    with torch.no_grad():
        return model.think(ids, thinking=THINKING)


def _check_no_near_ties(out, positions=slice(None)) -> None:
    """The lowest-energy start and the argmax are decided by more than rounding at ``positions``."""
    energies = out.sample_energies[:, :, positions]  # (samples, B, L)
    assert_no_near_ties(-energies.movedim(0, -1), loglik_tolerance(1, energies.abs().max()), "the starts' final energies")


# ------------------------------------------------------------------ the same numbers everywhere


def test_forward_in_eval_mode_is_think(model, tokenizer, folder):
    ids = _ids(tokenizer, (folder / "text.txt").read_text()[:CONTEXT])
    thought = _think(model, ids)
    with torch.no_grad():
        as_config = model(ids, labels=ids, thinking=THINKING)
        as_names = model(ids, **{f"think_{k}": v for k, v in AS_NAMES.items()})
    # the same operations on the same batch: bit for bit
    assert torch.equal(as_config.logits, thought.logits) and torch.equal(as_names.logits, thought.logits)
    # the loss: a float32 mean of L - 1 cross-entropies (forward also skips the last, unlabelled
    # position, which may change the summation order: at most (L - 1) eps relative, Higham)
    expected = F.cross_entropy(thought.logits[0, :-1], ids[0, 1:])
    assert float(as_config.loss) == pytest.approx(float(expected), rel=ids.shape[1] * FLOAT32_EPS)
    assert thought.function_evaluations == 2 * (2 * 3 + 1)
    with torch.no_grad():  # the settings matter: the checkpoint's defaults give other logits
        assert not torch.allclose(model(ids).logits, thought.logits)


def test_greedy_generate_picks_the_argmax_of_think_at_every_prefix(model, tokenizer):
    prompt = _ids(tokenizer, "abc dcba")
    new = 8
    with torch.no_grad():
        by_config = model.generate(prompt, max_new_tokens=new, do_sample=False, thinking=THINKING)
        by_names = model.generate(
            prompt, max_new_tokens=new, do_sample=False, **{f"think_{k}": v for k, v in AS_NAMES.items()}
        )
        in_generation_config = GenerationConfig(
            max_new_tokens=new, do_sample=False, **{f"think_{k}": v for k, v in AS_NAMES.items()}
        )
        by_generation_config = model.generate(prompt, generation_config=in_generation_config)
    assert torch.equal(by_config, by_names) and torch.equal(by_config, by_generation_config)
    for t in range(prompt.shape[1], by_config.shape[1]):
        out = _think(model, by_config[:, :t])  # the whole prefix, not the KV cache: other shapes, other rounding
        _check_no_near_ties(out, slice(-1, None))
        last = out.logits[0, -1]
        assert_no_near_ties(last, loglik_tolerance(1, last.abs().max()), "the greedy token's logits")
        assert by_config[0, t] == last.argmax(), t


def test_lm_eval_ebt_model_loglikelihoods_are_the_forwards_log_softmax(model, tokenizer, folder):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra: pip install -e '.[eval]'")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import eval.lm_eval_ebt  # noqa: F401  (registers "ebt")

    # lm-eval's own parsing of a model-args string: every value arrives as text or a number
    args = f"pretrained={folder / 'ebt'}," + ",".join(f"think_{k}={v}" for k, v in AS_NAMES.items())
    lm = get_model("ebt").create_from_arg_string(args, {"batch_size": 3, "device": "cpu", "dtype": "float32"})
    assert lm.thinking == THINKING
    text = (folder / "text.txt").read_text()
    pairs = [(text[i : i + 9 + i % 5], text[i + 9 + i % 5 : i + 14 + i % 3]) for i in range(0, 90, 10)]
    pairs = [(c, x) for c, x in pairs if c == c.rstrip()]  # lm-eval moves a context's trailing spaces to the continuation
    scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (loglik, _) in zip(pairs, scored):
        ids = _ids(tokenizer, context + continuation)
        n = len(continuation)
        with torch.no_grad():
            logits = model(ids, thinking=THINKING).logits[0]
        expected = F.log_softmax(logits[-n - 1 : -1], -1).gather(-1, ids[0, -n:, None]).sum()
        # lm-eval pads and batches the requests its own way: rounding differs, so the bound applies,
        # and the lowest-energy start must be decided by more than it at the scored positions
        _check_no_near_ties(_think(model, ids), slice(-n - 1, -1))
        assert loglik == pytest.approx(float(expected), abs=loglik_tolerance(n, logits.abs().max()))


def test_eval_thinking_perplexity_is_exp_of_the_forwards_cross_entropy(model, tokenizer, folder, tmp_path):
    out = tmp_path / "thinking.json"
    argv = ["thinking", "--model", str(folder / "ebt"), "--data", str(folder / "text.txt"), *AS_FLAGS]
    argv += ["--max-tokens", str(4 * CONTEXT), "--batch-size", "4", "--output", str(out)]
    assert eval_main(argv) == 0
    (row,) = json.loads(out.read_text())["ebt"]
    assert (row["steps"], row["samples"], row["function_evaluations"]) == (3, 2, 14)
    # eval thinking's windows: the file's first 4 windows of the model's context, in one batch
    windows = _ids(tokenizer, (folder / "text.txt").read_text())[0, : 4 * CONTEXT].view(4, CONTEXT)
    with torch.no_grad():
        output = model(windows, labels=windows, thinking=THINKING)
    terms = windows[:, 1:].numel()
    assert row["tokens"] == terms
    # forward's loss is a float32 mean of `terms` cross-entropies (at most terms * eps relative
    # error, Higham's bound for a float32 sum), eval thinking sums the same logits in float64;
    # the logits themselves may differ by rounding (per-token bound of loglik_tolerance).
    loss = float(output.loss)
    bound = terms * FLOAT32_EPS * loss + loglik_tolerance(1, output.logits.abs().max())
    assert math.log(row["perplexity"]) == pytest.approx(loss, abs=bound)


# ------------------------------------------------------------------ validation, once


BAD_VALUES = {
    "steps": [-1, 1.5, True, "3"],
    "step_size": [0, -1.0, math.nan, math.inf, "5"],
    "step_size_schedule": ["exponential", 1],
    "samples": [0, -2, 2.0, False],
    "selection": ["best", 1],
    "noise": [-0.1, math.nan, math.inf, -math.inf],
    "temperature": [-1.0, math.nan, math.inf],
    "tolerance": [-1e-3, math.nan, math.inf],
    "accept_decrease": ["yes", 1, 0.0],
    "seed": [-1, 1.5, math.nan, True],
    "init": ["zeros", 0],
    "halting": ["steps", 0],
}


def test_every_field_has_bad_values_under_test():
    assert set(BAD_VALUES) == set(ThinkingConfig.field_names())


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in BAD_VALUES.items() for v in values])
def test_a_bad_value_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ThinkingConfig\.{field}="):
        ThinkingConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"ThinkingConfig\.{field}="):
        ThinkingConfig().merged({field: value})


def test_good_values_and_unset_fields_are_accepted():
    assert ThinkingConfig().to_dict() == dict.fromkeys(ThinkingConfig.field_names())
    ThinkingConfig(steps=0, step_size=1e-3, step_size_schedule="inverse_sqrt", samples=8, selection="average", noise=0,
                   temperature=0.0, tolerance=0, accept_decrease=False, seed=0, init="uniform")  # fmt: skip
    with pytest.raises(ValueError, match="unknown thinking setting"):
        ThinkingConfig.from_dict({"stepz": 2})


# ------------------------------------------------------------------ the command-line flags


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m eval {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_flag_for_every_field(command):
    actions = {a.dest: a for a in _parser(command)._actions}
    for name, _, help_text in thinking_fields():
        action = actions[f"think_{name}"]
        assert f"--think-{name.replace('_', '-')}" in action.option_strings, (command, name)
        assert help_text and action.help.startswith(help_text), (command, name)


def test_flags_build_the_swept_configs_and_refuse_bad_values(capsys):
    parser = _parser("thinking")
    base = ["--model", "m", "--data", "d"]
    args = parser.parse_args([*base, *AS_FLAGS, "--steps", "1,3", "2", "--accept-decrease"])
    assert thinking_settings(args) == [THINKING.merged(steps=k, accept_decrease=True) for k in (1, 3, 2)]
    assert thinking_settings(parser.parse_args(base))[0].accept_decrease is None  # unset: the checkpoint's
    for flag, value in (("--noise", "nan"), ("--think-temperature", "-1"), ("--steps", "1,-2"), ("--init", "zeros"),
                        ("--samples", "two")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*base, flag, value])
        assert exit_info.value.code == 2
        field = flag.removeprefix("--").removeprefix("think-").replace("-", "_")
        assert f"ThinkingConfig.{field}=" in capsys.readouterr().err


REQUIRED = {"thinking": ["--model", "m", "--data", "d"], "reasoning": ["--model", "m", "--task", "addition"],
            "harness": ["--model", "m", "--tasks", "t"], "bench": []}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_bad_thinking_value_with_exit_2(command, capsys):
    assert set(REQUIRED) == set(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        _parser(command).parse_args([*REQUIRED[command], "--think-steps", "2,-1"])
    assert exit_info.value.code == 2 and "ThinkingConfig.steps=-1 is invalid" in capsys.readouterr().err
    args = _parser(command).parse_args([*REQUIRED[command], "--think-tolerance", "1e-3", "--no-think-accept-decrease"])
    assert {(t.tolerance, t.accept_decrease) for t in thinking_settings(args)} == {(1e-3, False)}


def test_reasoning_keeps_seed_for_its_problems_and_think_seed_for_thinking():
    args = _parser("reasoning").parse_args(["--model", "m", "--task", "addition", "--seed", "3", "--think-seed", "9"])
    assert args.seed == 3 and thinking_settings(args)[0].seed == 9


def test_lm_eval_model_refuses_unknown_and_bad_thinking_args(folder):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra: pip install -e '.[eval]'")
    from eval.lm_eval_ebt import EBTLM

    with pytest.raises(ValueError, match="think_stepz"):
        EBTLM(str(folder / "ebt"), device="cpu", think_stepz=2)
    with pytest.raises(ValueError, match=r"ThinkingConfig\.noise="):
        EBTLM(str(folder / "ebt"), device="cpu", think_noise="nan")
