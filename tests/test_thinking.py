"""Inference-time thinking (issue 4): the think() controls, energy as uncertainty, the local
``evaluate`` metrics and ``python -m eval thinking``."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_data_file, tiny_ebt_config
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score
from transformers import LlamaForCausalLM

from ebt import RECIPES, EBTForCausalLM, ThinkingConfig, llama_twin_config
from ebt.reference import plain_energy
from eval.__main__ import main as eval_main
from eval.metrics import load as load_metric
from eval.uncertainty import auroc, pearson, score_tokens, spearman
from train.tokenizer import char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(scope="module")
def model() -> EBTForCausalLM:
    """float64: these tests compare trajectories, which float32 rounding can tip at near-ties."""
    torch.manual_seed(0)
    config = tiny_ebt_config(vocab_size=len(ALPHABET) + 2, hidden_size=32, intermediate_size=32, initializer_range=0.5)
    return EBTForCausalLM(config).double().eval()


def _ids(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, len(ALPHABET) + 2, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ think() controls


def test_self_verification_keeps_the_lowest_final_energy_per_position(model):
    ids = _ids()
    best = model.think(ids, steps=3, samples=4)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    starts = model.initial_logits(positions, ThinkingConfig(samples=4).resolve(model.config)).view(4, *ids.shape, -1)
    alone = [model.think(ids, steps=3, init_logits=starts[s]) for s in range(4)]
    finals = torch.stack([a.energies[..., -1] for a in alone])  # (S, B, L)
    torch.testing.assert_close(best.sample_energies, finals)
    chosen = finals.argmin(0)
    assert len(chosen.unique()) > 1, "every position chose the same start: the test would not see a per-position choice"
    expected = torch.stack([a.logits for a in alone]).gather(0, chosen[None, ..., None].expand(1, *best.logits.shape))[0]
    torch.testing.assert_close(best.logits, expected)
    assert best.function_evaluations == 4 * (2 * 3 + 1)


def test_more_steps_change_the_prediction_and_are_all_spent(model):
    one, four = model.think(_ids(), steps=1), model.think(_ids(), steps=4)
    assert not torch.allclose(one.logits, four.logits)
    assert (four.steps_taken == 4).all() and four.energies.shape[-1] == 5
    # a prefix of the 4-step trajectory is the 1-step run (same seeded start)
    torch.testing.assert_close(four.energies[..., :1], one.energies[..., :1])


def test_adaptive_computation_stops_a_position_once_its_energy_falls_less_than_the_tolerance(model):
    steps, tol = 8, 2e-3
    out = model.think(_ids(), steps=steps, tolerance=tol)
    taken, energy = out.steps_taken, out.energies  # energy[..., i]: energy after i steps
    assert 1 <= taken.min() and taken.max() <= steps and taken.min() < steps, "tolerance never (or always) stopped"
    drops = energy[..., :-1] - energy[..., 1:]  # drops[..., i]: what step i+1 gained
    for b, r in torch.nonzero(taken < steps).tolist():
        k = int(taken[b, r])
        assert (drops[b, r, : k - 1] >= tol).all(), "stopped although every step fell enough"
        assert drops[b, r, k - 1] < tol, "stopped without a small decrease"
    # an unreachable tolerance spends exactly one step everywhere, i.e. is the 1-step answer
    stopped = model.think(_ids(), steps=steps, tolerance=1e9)
    assert (stopped.steps_taken == 1).all()
    torch.testing.assert_close(stopped.logits, model.think(_ids(), steps=1).logits)


def test_accept_decrease_never_lets_the_energy_rise(model):
    kwargs = dict(steps=6, step_size=200.0)
    plain = model.think(_ids(), **kwargs)
    assert (plain.energies[..., 1:] > plain.energies[..., :-1] + 1e-6).any(), "this step size never overshoots: test is void"
    careful = model.think(_ids(), accept_decrease=True, **kwargs)
    assert (careful.energies[..., 1:] <= careful.energies[..., :-1] + 1e-6).all()
    assert (careful.energies[..., -1] <= plain.energies[..., 0] + 1e-6).all()
    assert (careful.steps_taken <= 6).all() and (careful.steps_taken < 6).any()


def test_langevin_temperature_scales_the_noise_variance(model):
    ids = _ids()
    cold = model.think(ids, steps=3, noise=2.0, temperature=0.0).logits
    torch.testing.assert_close(cold, model.think(ids, steps=3).logits)
    hot = model.think(ids, steps=3, noise=1.0, temperature=4.0).logits
    torch.testing.assert_close(hot, model.think(ids, steps=3, noise=2.0).logits)
    assert not torch.allclose(hot, cold)


def test_starts_are_batch_and_prefix_invariant(model):
    ids = _ids(length=16)
    full = model.think(ids, steps=3, samples=2, noise=1.0)
    row = model.think(ids[1:2, :9], steps=3, samples=2, noise=1.0)
    torch.testing.assert_close(row.logits[0], full.logits[1, :9])


def test_thinking_is_reproducible_by_seed(model):
    a, b = model.think(_ids(), steps=2, seed=3).logits, model.think(_ids(), steps=2, seed=3).logits
    assert torch.equal(a, b) and not torch.allclose(a, model.think(_ids(), steps=2, seed=4).logits)
    uniform = ThinkingConfig(steps=2, init="uniform", samples=1)  # no randomness left: the seed is moot
    assert torch.equal(
        model.think(_ids(), thinking=uniform, seed=3).logits, model.think(_ids(), thinking=uniform, seed=9).logits
    )


def test_zero_steps_return_the_starting_candidates(model):
    ids = _ids()
    out = model.think(ids, steps=0)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    start = model.initial_logits(positions, ThinkingConfig(steps=0).resolve(model.config)).view(*ids.shape, -1)
    assert torch.equal(out.logits, start) and out.energies.shape[-1] == 1 and out.function_evaluations == 1


def test_step_size_schedule_scales_each_step(model):
    """'linear' over 2 steps multiplies alpha by 1, then 1/2: the second step, done by hand, matches."""
    ids = _ids()
    length = ids.shape[1]
    scheduled = model.think(ids, steps=2, step_size=8.0, step_size_schedule="linear")
    z1 = model.think(ids, steps=1, step_size=8.0).logits  # the first step is unscaled
    p = torch.softmax(z1, -1).requires_grad_()
    with torch.enable_grad():
        energy = model.model.energy(model.model.encode(ids), p, torch.arange(length), step=1)
        (grad,) = torch.autograd.grad(energy.sum(), p)
    torch.testing.assert_close(scheduled.logits, p.detach() - 4.0 * grad)  # probability rule, alpha 8 x 1/2
    assert ThinkingConfig(steps=4, step_size_schedule="cosine").step_size_factor(0) == 1.0
    assert ThinkingConfig(steps=4, step_size_schedule="inverse_sqrt").step_size_factor(3) == 0.5


def test_average_selection_is_the_mean_of_the_samples_distributions(model):
    ids = _ids()
    avg = model.think(ids, steps=2, samples=3, selection="average")
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    starts = model.initial_logits(positions, ThinkingConfig(samples=3).resolve(model.config)).view(3, *ids.shape, -1)
    probs = torch.stack([torch.softmax(model.think(ids, steps=2, init_logits=starts[s]).logits, -1) for s in range(3)])
    torch.testing.assert_close(torch.softmax(avg.logits, -1), probs.mean(0))


def test_invalid_inputs_fail_clearly(model):
    with pytest.raises(ValueError, match="outside"):
        model.think(torch.tensor([[0, 1, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="at least one token"):
        model.think(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="ThinkingConfig.step_size"):
        model.think(_ids(), step_size=float("inf"))
    with pytest.raises(ValueError, match="ThinkingConfig.tolerance"):
        model(_ids(), think_tolerance=float("nan"))
    with pytest.raises(ValueError, match="unknown thinking setting"):
        model.think(_ids(), stepz=2)


def test_train_mode_under_no_grad_is_an_error_not_thinking(model):
    model.train()
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="needs autograd"):
            model(_ids(), labels=_ids())
        with pytest.raises(ValueError, match="eval mode"):
            model(_ids(), labels=_ids(), think_steps=2)
    finally:
        model.eval()


def test_a_prompt_longer_than_the_context_fails_clearly(model):
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model.think(_ids(length=33))


# ------------------------------------------------------------------ energy as uncertainty


def test_correlation_and_auroc_match_scipy_and_sklearn():
    gen = np.random.default_rng(0)
    x = gen.normal(size=300)
    y = 0.5 * x + gen.normal(size=300)
    y[:40] = np.round(y[:40])  # ties
    tx, ty = torch.tensor(x), torch.tensor(np.round(y, 1))
    assert pearson(tx, ty) == pytest.approx(pearsonr(x, np.round(y, 1)).statistic, abs=1e-12)
    assert spearman(tx, ty) == pytest.approx(spearmanr(x, np.round(y, 1)).statistic, abs=1e-12)
    neg, pos = np.round(gen.normal(size=50), 1), np.round(gen.normal(0.7, size=70), 1)
    expected = roc_auc_score([0] * 50 + [1] * 70, np.concatenate((neg, pos)))
    assert auroc(torch.tensor(neg), torch.tensor(pos)) == pytest.approx(expected, abs=1e-12)


def test_relative_energy_subtracts_the_uniform_candidates_energy_on_the_same_context(model):
    one_landscape = copy.deepcopy(model)
    one_landscape.model.step_embed = None  # one landscape: think()'s start energy is comparable to the final one
    ids = _ids()
    scores = score_tokens(one_landscape, ids, steps=2)
    uniform_start = torch.zeros(*ids.shape, model.config.vocab_size, dtype=torch.float64)  # softmax(0) = uniform
    reference = one_landscape.think(ids, steps=1, init_logits=uniform_start).energies[..., 0]
    torch.testing.assert_close(scores.reference_energy, reference[:, :-1])
    torch.testing.assert_close(scores.relative_energy, scores.energy - reference[:, :-1])


def test_rerank_picks_the_lowest_plain_energy_one_hot_among_the_top_k(model):
    """The verifier's choice is recomputed with the doubled-sequence reference (none of the
    cached-context code): one-hot candidates of the k most likely tokens, lowest energy wins."""
    ids = _ids()
    k, steps = 4, 2
    scores = score_tokens(model, ids, steps=steps, rerank_top=k)
    logits = model.think(ids, steps=steps).logits  # (B, L, V)
    top = logits.topk(k, dim=-1).indices
    with torch.no_grad():
        energies = torch.stack(
            [plain_energy(model, ids, F.one_hot(top[..., j], model.config.vocab_size).to(logits.dtype), step=steps)
             for j in range(k)], -1,
        )  # fmt: skip
    expected = top.gather(-1, energies.argmin(-1, keepdim=True))[:, :-1, 0]
    # Two float64 paths agree to ~1e-12 on energies of order 1: compare where the best candidate
    # wins by more than 1e-9 (a near-tie may go either way on another CPU).
    lowest = energies[:, :-1].sort(-1).values
    clear = (lowest[..., 1] - lowest[..., 0]) > 1e-9
    assert clear.float().mean() > 0.9
    assert torch.equal(scores.argmax, logits[:, :-1].argmax(-1))
    assert torch.equal(scores.reranked[clear], expected[clear])
    assert not torch.equal(expected, scores.argmax), "an untrained energy should disagree with the argmax somewhere"
    assert score_tokens(model, ids, steps=steps).reranked is None


def test_energy_predicts_loss_on_held_out_text_after_training():
    """Trains a tiny EBT (S1-like recipe) for 60 steps on tiny Shakespeare, then checks on the
    held-out last 10% that per-token energy and loss are positively correlated: Spearman > 0.2
    (an untrained model of this shape gives about 0)."""
    text = shared_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = char_tokenizer([text])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    cut, length = int(len(ids) * 0.9), 32
    torch.manual_seed(0)
    config = tiny_ebt_config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, max_position_embeddings=length, **RECIPES["s1"]
    )
    model = EBTForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        start = torch.randint(0, cut - length, (16,), generator=gen)
        batch = torch.stack([ids[s : s + length] for s in start.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    held_out = ids[cut : cut + 64 * length].view(64, length)
    scores = score_tokens(model, held_out)
    assert scores.nll.mean() < 3.0, "the model did not learn (uniform is ln(65) = 4.2 nats): nothing to correlate"
    assert spearman(scores.energy, scores.nll) > 0.2
    assert pearson(scores.energy, scores.nll) > 0.0
    assert spearman(scores.relative_energy, scores.nll) > 0.2


# ------------------------------------------------------------------ metrics and the eval command


def test_local_perplexity_metric_is_exp_of_mean_nll():
    result = load_metric("perplexity").compute(nll_sum=[3.0, 5.0], token_count=[2, 6])
    assert result == pytest.approx({"perplexity": math.e, "nll_per_token": 1.0, "tokens": 8})
    with pytest.raises(ValueError, match="no local metric"):
        load_metric("accuracy_from_the_hub")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model):
    """A saved EBT and its Transformer++ twin sharing a tokenizer, and two small text files."""
    root = tmp_path_factory.mktemp("thinking")
    tokenizer = char_tokenizer([ALPHABET])
    copy.deepcopy(model).float().save_pretrained(root / "ebt")
    tokenizer.save_pretrained(root / "ebt")
    torch.manual_seed(1)
    LlamaForCausalLM(llama_twin_config(model.config)).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    gen = np.random.default_rng(0)
    (root / "id.txt").write_text("".join(gen.choice(list("abcde "), size=2000)))
    (root / "ood.txt").write_text("".join(gen.choice(list("vwxyz,."), size=2000)))
    return root


def test_eval_thinking_writes_the_curve_the_twin_line_json_and_plot(checkpoints, capsys):
    out = checkpoints / "out" / "results.json"
    argv = [
        "thinking", "--model", str(checkpoints / "ebt"), "--twin", str(checkpoints / "llama"),
        "--data", str(checkpoints / "id.txt"), "--val-fraction", "0.5", "--ood-data", str(checkpoints / "ood.txt"),
        "--steps", "1,3", "--samples", "1,2", "--max-tokens", "256", "--output", str(out), "--rerank-top", "3",
    ]  # fmt: skip
    assert eval_main(argv) == 0
    record = json.loads(out.read_text())
    assert {(r["dataset"], r["steps"], r["samples"]) for r in record["ebt"]} == {
        (d, k, s) for d in ("id", "ood") for k in (1, 3) for s in (1, 2)
    }
    for r in record["ebt"]:
        assert r["function_evaluations"] == r["samples"] * (2 * r["steps"] + 1)
        assert r["tokens"] == 8 * 31 and r["perplexity"] == pytest.approx(math.exp(r["nll_per_token"]))
    assert {(r["steps"], r["samples"]) for r in record["auroc"]} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    assert all(0 <= r[k] <= 1 for r in record["auroc"] for k in ("auroc_energy", "auroc_relative_energy"))
    # The twin's line is exactly its own cross-entropy on the same windows.
    twin = LlamaForCausalLM.from_pretrained(checkpoints / "llama")
    tokenizer = char_tokenizer([ALPHABET])
    text = (checkpoints / "id.txt").read_text()
    ids = torch.tensor(tokenizer(text[1000:], add_special_tokens=False)["input_ids"][: 8 * 32]).view(8, 32)
    with torch.no_grad():
        loss = twin(ids, labels=ids).loss
    assert record["twin"]["id"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # The EBT row for (3 steps, best of 2) is think() on the same windows.
    ebt = EBTForCausalLM.from_pretrained(checkpoints / "ebt", dtype=torch.float32).eval()
    expected = score_tokens(ebt, ids, steps=3, samples=2)
    row = next(r for r in record["ebt"] if (r["dataset"], r["steps"], r["samples"]) == ("id", 3, 2))
    assert row["perplexity"] == pytest.approx(math.exp(expected.nll.mean()), rel=1e-5)
    assert row["relative_energy_loss_spearman"] == pytest.approx(spearman(expected.relative_energy, expected.nll), abs=1e-6)
    reranked = score_tokens(ebt, ids, steps=3, samples=2, rerank_top=3)
    assert row["argmax_accuracy"] == pytest.approx(float((reranked.argmax == ids[:, 1:]).double().mean()))
    assert row["rerank_accuracy"] == pytest.approx(float((reranked.reranked == ids[:, 1:]).double().mean()))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Transformer++ twin" in printed and "lowest energy among the top 3" in printed


@pytest.mark.parametrize(
    ("swap", "extra", "message"),
    [
        (True, [], "not an EBT"),
        (False, ["--twin", "{ebt}"], "--twin .* is an EBT"),
        (False, ["--block-size", "33"], "the model's context"),
        (False, ["--data", "{missing}"], "no such data file"),
    ],
)
def test_eval_thinking_refuses_invalid_settings_with_a_message(checkpoints, capsys, swap, extra, message):
    paths = {"ebt": str(checkpoints / "ebt"), "missing": str(checkpoints / "missing.txt")}
    model = checkpoints / ("llama" if swap else "ebt")
    argv = ["thinking", "--model", str(model), "--data", str(checkpoints / "id.txt"), "--output", str(checkpoints / "x.json")]
    argv += [a.format(**paths) for a in extra]
    assert eval_main(argv) == 2  # reported as "error: ...", not raised
    assert re.search(message, capsys.readouterr().err)


# ------------------------------------------------------------------ draft start, damped mirror steps


@pytest.fixture(scope="module")
def draft_model() -> EBTForCausalLM:
    """A draft head (one own block) and damped mirror steps pulled towards the draft; float64.
    Default initialisation: the energy's gradient is then small against kl_weight."""
    torch.manual_seed(1)
    config = tiny_ebt_config(
        vocab_size=len(ALPHABET) + 2,
        hidden_size=32,
        intermediate_size=32,
        **{**RECIPES["s2"], "update_rule": "mirror", "step_size": 1.0, "step_size_random_scale": 1.0},
        kl_weight=0.3,
        draft_head=True,
        draft_layers=1,
        inference_init="draft",
    )
    return EBTForCausalLM(config).double().eval()


def test_zero_steps_from_the_draft_is_the_draft_head(draft_model):
    ids = _ids()
    context = draft_model.model.encode(ids)
    out = draft_model.think(ids, steps=0)
    assert torch.equal(out.logits, context.draft_logits)
    # best of 3 from the draft: the first start is the draft itself, the others add seeded noise
    three = draft_model.think(ids, steps=0, samples=3)
    assert torch.equal(three.sample_energies[0], out.energies[..., -1])


def test_damped_mirror_steps_converge_to_the_kl_fixed_point(draft_model):
    """z <- (1 - a t) z + a t z_q - a g: at a fixed point z = z_q - g(z) / t. Where the energy's
    gradient varies slowly against the pull t (here: default init; with weights 25x larger the
    iteration does not contract, measured), the candidate stops moving and satisfies that
    equation. Float64: the last step moved by ~1e-12 when measured; bound 1e-6."""
    ids = _ids()
    far = draft_model.think(ids, steps=200).logits
    further = draft_model.think(ids, steps=201).logits
    assert (torch.softmax(far, -1) - torch.softmax(further, -1)).abs().max() < 1e-6
    context = draft_model.model.encode(ids)
    p = torch.softmax(far, -1).requires_grad_()
    with torch.enable_grad():
        energy = draft_model.model.energy(context, p, torch.arange(ids.shape[1]), step=0)
        (grad,) = torch.autograd.grad(energy.sum(), p)
    fixed = context.draft_logits - grad / draft_model.config.kl_weight
    torch.testing.assert_close(torch.softmax(far, -1), torch.softmax(fixed, -1), atol=1e-6, rtol=0)


def test_draft_generation_cached_equals_uncached(draft_model):
    """The cache keeps only the latest draft; generation must read the right one at every token."""
    prompt = _ids(batch=2, length=6)
    kwargs = {"max_new_tokens": 8, "think_steps": 2, "think_samples": 2}
    cached = draft_model.generate(prompt, **kwargs)
    assert torch.equal(cached, draft_model.generate(prompt, use_cache=False, **kwargs))
    for t in range(6, 14):  # greedy picks think()'s argmax on each prefix
        assert torch.equal(cached[:, t], draft_model.think(cached[:, :t], steps=2, samples=2).logits[:, -1].argmax(-1))


def test_residual_halting_stops_a_position_once_a_step_barely_moves_it(draft_model):
    """halting='residual': a position stops after the first step that moves its distribution by
    less than the tolerance (largest change of a probability); up to then it follows the free run."""
    ids, steps, tol = _ids(), 40, 1e-3
    free = draft_model.think(ids, steps=steps, return_trajectory=True)
    probs = torch.softmax(free.trajectory, -1)  # (B, L, steps + 1, V)
    moves = (probs[..., 1:, :] - probs[..., :-1, :]).abs().amax(-1)  # (B, L, steps): what step i + 1 moved
    halted = draft_model.think(ids, steps=steps, tolerance=tol, halting="residual")
    taken = halted.steps_taken
    assert taken.min() < steps and len(taken.unique()) > 1, "every position stopped together: the test sees nothing"
    for b, r in torch.nonzero(taken < steps).tolist():
        k = int(taken[b, r])
        assert (moves[b, r, : k - 1] >= tol).all() and moves[b, r, k - 1] < tol
    expected = free.trajectory.gather(2, taken[..., None, None].expand(*taken.shape, 1, free.trajectory.shape[-1]))[:, :, 0]
    torch.testing.assert_close(halted.logits, expected)
