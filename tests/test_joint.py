"""The joint continuation mode (issue 13): a block of m candidates after the prompt, refined together.

What it must share with the autoregressive mode: no leak (the answer's own ids never reach the
energy), batch and padding invariance, a plain reference that agrees, a true second-order
training gradient, checkpoints, generation; plus what is its own: the block sees itself
(bidirectional), decisions (halting, best-of-N) are per problem, and extra energy terms compose.

Tolerances: comparisons of two computations of the same quantity run in float64, where a sum of
a few hundred products of O(1) numbers carries a relative error of about 1e-13; 1e-9 leaves four
orders of magnitude of margin and is still far below any real difference (O(1e-2) and up).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from ebt import EBTConfig, EBTForCausalLM
from ebt.recipes import recipe
from ebt.reference import plain_block_energy

M = 4  # block size of the tiny joint model
VOCAB = 11
F64 = dict(atol=1e-9, rtol=1e-9)


def _joint(tiny_config, dtype=torch.float64, seed: int = 0, **overrides) -> EBTForCausalLM:
    fields = dict(joint_block_size=M, update_rule="mirror", step_size=2.0, train_steps=2, detach_between_steps=False)
    torch.manual_seed(seed)
    return EBTForCausalLM(tiny_config(**{**fields, **overrides})).to(dtype)


def _prompts(seed: int, bsz: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (bsz, length), generator=torch.Generator().manual_seed(seed))


def _probs(seed: int, bsz: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(bsz, M, VOCAB, generator=gen, dtype=torch.float64), -1)


# ------------------------------------------------------------------ attention pattern


def test_block_energy_sees_the_whole_prompt_and_the_whole_block(tiny_config):
    model = _joint(tiny_config).eval()
    prompt, probs = _prompts(0), _probs(1).requires_grad_()
    energy = model.model.block_energy_function(model.model.encode(prompt), M)
    e = energy(probs)
    assert e.shape == (3, M)
    # Bidirectional: the energy at block position 0 depends on the candidate at the last one.
    (grad,) = torch.autograd.grad(e[:, 0].sum(), probs)
    assert grad[:, M - 1].abs().max() > 1e-6
    # The whole prompt, its first token included, is visible to every block position.
    changed = prompt.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    e2 = model.model.block_energy_function(model.model.encode(changed), M)(probs)
    assert ((e2 - e).abs() > 1e-6).all()


def test_the_answer_ids_in_a_row_never_reach_the_prediction(tiny_config):
    """Forward reads a row as prompt + block; the block's ids must not leak into the logits."""
    model = _joint(tiny_config).eval()
    row = torch.cat((_prompts(2), _prompts(3, length=M)), 1)
    other = row.clone()
    other[:, -M:] = (other[:, -M:] + 5) % VOCAB
    with torch.no_grad():
        a, b = model(row, think_steps=3), model(other, think_steps=3)
    assert a.logits.shape == (3, M, VOCAB)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("start", [None, 1])
def test_padding_ids_do_not_matter_and_a_problem_is_the_same_alone_or_in_a_batch(tiny_config, start):
    model = _joint(tiny_config, joint_block_start=start).eval()
    short, long = _prompts(4, 1, 3), _prompts(5, 1, 6)
    batch = torch.cat((torch.cat((torch.full((1, 3), 7), short), 1), long))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        together = model.think(batch, mask, steps=3, samples=2)
        alone = [model.think(short, steps=3, samples=2), model.think(long, steps=3, samples=2)]
        other_pad = model.think(torch.cat((torch.cat((torch.full((1, 3), 2), short), 1), long)), mask, steps=3, samples=2)
    for i in range(2):
        torch.testing.assert_close(together.logits[i], alone[i].logits[0], **F64)
        torch.testing.assert_close(together.energies[i], alone[i].energies[0], **F64)
    torch.testing.assert_close(together.logits, other_pad.logits, **F64)


# ------------------------------------------------------------------ reference and gradients


@pytest.mark.parametrize("start", [None, 1])
def test_cached_block_energy_and_training_step_equal_the_plain_reference(tiny_config, start):
    """Also with the block placed from the prompt's start (joint_block_start), which in row 0
    (two padding tokens) overlaps the prompt's own positions."""
    model = _joint(tiny_config, train_segments=2, langevin_noise=0.5, joint_block_start=start).train()
    prompt = torch.cat((torch.full((1, 2), 3), _prompts(6, 1, 4)), 1)  # left padding in row 0
    prompt = torch.cat((prompt, _prompts(7, 2, 6)))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    probs = _probs(8).requires_grad_()
    cached = model.model.block_energy_function(model.model.encode(prompt, mask), M)(probs, 1)
    plain = plain_block_energy(model, prompt, mask, probs, 1)
    torch.testing.assert_close(cached, plain, **F64)
    g_cached, g_plain = (torch.autograd.grad(e.sum(), probs)[0] for e in (cached, plain))
    torch.testing.assert_close(g_cached, g_plain, **F64)

    block = _prompts(9, 3, M)
    row, row_mask = torch.cat((prompt, block), 1), torch.cat((mask, torch.ones_like(block)), 1)
    labels = torch.cat((torch.full_like(prompt, -100), block), 1)
    z0 = torch.randn(3, M, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def step(energy_fn):
        model.zero_grad()
        torch.manual_seed(11)  # same step counts and noise on both paths
        out = model.training_loss(row, row_mask, labels, z0, energy_fn=energy_fn)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_c, grads_c = step(None)
    out_p, grads_p = step(lambda p, s: plain_block_energy(model, prompt, mask, p, s))
    assert out_c.energies.shape[-1] == 2 * 2  # two segments of two steps, each step's energy kept
    torch.testing.assert_close(out_c.loss, out_p.loss, **F64)
    assert grads_c.keys() == grads_p.keys() and len(grads_c) > 10
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_p[name], **F64, msg=name)


def test_joint_training_gradient_passes_gradcheck(tiny_config):
    """One segment, every step second order: the analytical gradient is the true derivative (segments
    detach their start, a deliberate truncation that gradcheck would rightly flag)."""
    cfg = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, vocab_size=5, second_order="all")
    model = _joint(tiny_config, **cfg).train()
    gen = torch.Generator().manual_seed(0)
    row = torch.randint(0, 5, (2, 3 + M), generator=gen)
    labels = torch.cat((torch.full((2, 3), -100), row[:, 3:]), 1)
    z0 = torch.randn(2, M, 5, dtype=torch.float64, generator=gen)
    names = ["alpha", "model.energy_head.weight", "model.layers.0.self_attn.k_proj.weight"]
    params = dict(model.named_parameters())

    def loss(*values):
        return functional_call(model, {**params, **dict(zip(names, values))}, (row,), dict(labels=labels, init_logits=z0)).loss

    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_deep_supervision_scores_every_segment(tiny_config):
    """With 3 segments the objective is the mean of the three segments' final losses, each segment
    starting from the previous one's (detached) end: rerunning the segments by hand gives it."""
    model = _joint(tiny_config, train_segments=3, train_steps=1).train()
    prompt, block = _prompts(12, 2), _prompts(13, 2, M)
    row, labels = torch.cat((prompt, block), 1), torch.cat((torch.full_like(prompt, -100), block), 1)
    z0 = torch.randn(2, M, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    out = model(row, labels=labels, init_logits=z0)
    energy = model.model.block_energy_function(model.model.encode(prompt), M)
    z, losses = z0, []
    for _ in range(3):
        result = model._optimize(energy, z, steps=1, step_size=model.alpha, training=True, targets=block, final_energy=False)
        z = result["z"].detach()
        losses.append(result["step_losses"][-1])
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), **F64)
    assert len({round(float(v.detach()), 9) for v in losses}) == 3  # the segments really continue: three different losses


# ------------------------------------------------------------------ per-problem decisions and energy terms


def test_halting_and_best_of_n_are_decided_per_problem(tiny_config):
    model = _joint(tiny_config).eval()
    prompt = _prompts(15, 4)
    with torch.no_grad():
        path = model.think(prompt, steps=12, return_trajectory=True).trajectory  # (B, m, 13, V)
        probs = torch.softmax(path, -1)
        moves = (probs[:, :, 1:] - probs[:, :, :-1]).abs().amax(dim=(1, 3))  # (B, 12): a problem's largest move
        tolerance = float(moves[:, :6].min()) * 1.01  # some problem moves less than this within 6 steps
        halted = model.think(prompt, steps=12, tolerance=tolerance, halting="residual")
        best = model.think(prompt, steps=2, samples=3)
    # A problem halts after the first step that moved its whole block by less than the tolerance
    # (that step is applied); every block position of the problem took the same number of steps.
    small = moves < tolerance
    expected = torch.where(small.any(1), small.long().argmax(1) + 1, 12)
    assert (halted.steps_taken == expected[:, None]).all(), (halted.steps_taken, expected)
    assert expected.min() <= 6
    # the chosen start is the one with the lowest summed energy, the same start for the whole block
    summed = best.sample_energies.sum(-1)  # (S, B)
    chosen = summed.argmin(0)
    torch.testing.assert_close(best.energies[..., -1], best.sample_energies[chosen, torch.arange(4)], **F64)


def test_attractor_checkpoints_keep_only_steps_that_lower_a_problems_energy(tiny_config):
    """The attractor recipe thinks with accept_decrease by default: a problem's summed energy
    never rises, however far a step overshoots (float64: 1e-9 as in the module docstring)."""
    model = _joint(tiny_config, **recipe("attractor")).eval()
    assert model.config.thinking_config.accept_decrease
    prompt = _prompts(21, 4)
    with torch.no_grad():
        plain = model.think(prompt, steps=8, step_size=200.0, accept_decrease=False).energies.sum(1)  # (B, 9)
        kept = model.think(prompt, steps=8, step_size=200.0).energies.sum(1)
    assert (plain[:, 1:] > plain[:, :-1] + 1e-9).any(), "this step size never overshoots: test is void"
    assert (kept[:, 1:] <= kept[:, :-1] + 1e-9).all(), kept


def test_energy_terms_join_the_inner_loop(tiny_config):
    """A term that rewards token 3 everywhere, weighted heavily, makes every block position 3;
    a per-problem term (B,) is spread evenly over the block, so a problem's total energy (and every
    gradient) is the same as with the equivalent per-position term."""
    model = _joint(tiny_config).eval()
    prompt = _prompts(16)

    def likes_three(probs, ids, mask):
        return -probs[..., 3]  # (B, m): per position

    def likes_three_total(probs, ids, mask):
        assert ids.shape == (6, 6) and mask.shape == (6, 6)  # repeated for the 2 samples
        return -probs[..., 3].sum(-1)  # (B,): per problem

    with torch.no_grad():
        plain = model.think(prompt, steps=6)
        pulled = model.think(prompt, steps=6, energy_terms=[(50.0, likes_three)])
        per_problem = model.think(prompt, steps=6, samples=2, energy_terms=[(50.0, likes_three_total)])
        per_position = model.think(prompt, steps=6, samples=2, energy_terms=[(50.0, likes_three)])
    assert (pulled.logits.argmax(-1) == 3).all() and not (plain.logits.argmax(-1) == 3).all()
    torch.testing.assert_close(per_problem.logits, per_position.logits, **F64)
    with pytest.raises(ValueError, match="energy term returned shape"):
        model.think(prompt, energy_terms=[(1.0, lambda p, i, m: p[..., 0, 0, None])])
    with pytest.raises(ValueError, match="needs input_ids"):
        model.think(context=model.model.encode(prompt), energy_terms=[(1.0, likes_three)])


# ------------------------------------------------------------------ generation and checkpoints


@pytest.mark.parametrize("start", [None, 1])
def test_generate_emits_the_thought_block_then_block_after_block(tiny_config, start):
    model = _joint(tiny_config, dtype=torch.float32, eos_token_id=None, joint_block_start=start).eval()
    prompt = _prompts(17, 2).clone()
    with torch.no_grad():
        first = model.think(prompt, steps=2).logits.argmax(-1)
        out = model.generate(prompt, max_new_tokens=2 * M + 1, think_steps=2, eos_token_id=None, pad_token_id=0)
        uncached = model.generate(
            prompt, max_new_tokens=2 * M + 1, think_steps=2, eos_token_id=None, pad_token_id=0, use_cache=False
        )
        second = model.think(out[:, : 6 + M], steps=2).logits.argmax(-1)
    assert out.shape == (2, 6 + 2 * M + 1)
    assert torch.equal(out[:, 6 : 6 + M], first)
    assert torch.equal(out[:, 6 + M : 6 + 2 * M], second)  # the second block continues prompt + first block
    assert torch.equal(out, uncached)


def test_generate_cuts_each_problem_at_its_first_eos(tiny_config):
    model = _joint(tiny_config, dtype=torch.float32).eval()
    prompt = _prompts(18, 3)
    with torch.no_grad():
        tokens = model.think(prompt, steps=2).logits.argmax(-1)  # (3, M)
        eos = int(tokens[0, 1])  # declare the second token of problem 0 the EOS
        out = model.generate(prompt, max_new_tokens=3 * M, think_steps=2, eos_token_id=eos, pad_token_id=10)
    new = out[:, 6:]
    for b in range(3):
        row = new[b].tolist()
        if eos in row:
            cut = row.index(eos)
            assert all(t == 10 for t in row[cut + 1 :]), row
    assert new[0, 1] == eos and (new[0, 2:] == 10).all()


@pytest.mark.parametrize("block", [0, M])
def test_joint_checkpoint_round_trip(tiny_config, tmp_path, block):
    from transformers import AutoModelForCausalLM

    model = _joint(tiny_config, dtype=torch.float32, joint_block_size=block, inference_steps=3).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.joint_block_size == block
    row = _prompts(19, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(row).logits, loaded(row).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(joint_block_size=-1), "joint_block_size"),
        (dict(joint_block_size=32), "max_position_embeddings"),
        (dict(joint_block_size=4, draft_head=True), "no draft head"),
        (dict(train_segments=0), "train_segments"),
        (dict(joint_block_start=1), "joint_block_start.*joint mode"),
        (dict(joint_block_size=4, joint_block_start=29), "joint_block_start.*28"),
        (dict(joint_block_size=4, joint_block_start=-1), "joint_block_start"),
        (dict(joint_block_size=4, calibration_weight=1.0, calibration_offset=True), "calibration_offset.*autoregressive"),
        (dict(calibration_offset=True), "calibration_weight > 0"),
    ],
)
def test_invalid_joint_settings_fail_clearly(fields, message):
    with pytest.raises(ValueError, match=message):
        EBTConfig(vocab_size=11, max_position_embeddings=32, **fields)


def test_a_row_without_room_for_the_block_fails_clearly(tiny_config):
    model = _joint(tiny_config).eval()
    with pytest.raises(ValueError, match="answer block"):
        model(_prompts(20, 1, M))


def test_trained_count_covers_every_segment():
    """Deep supervision continues one trajectory, so thinking's default is steps x segments."""
    cfg = EBTConfig(vocab_size=11, max_position_embeddings=32, train_steps=1, train_steps_max=3, train_segments=3)
    assert cfg.trained_steps == 9 and cfg.thinking_config.steps == 9


@pytest.mark.parametrize("task", ["sudoku", "sudoku6", "sorting"])
def test_joint_reasoning_configs_train_on_the_rows_of_their_twins(task):
    """configs/reasoning/<task>-joint.yaml differs from its autoregressive EBT and Transformer++
    twins only in the model (kind, recipe, EBT fields) and run folder: same rows, same tokens."""
    from dataclasses import asdict
    from pathlib import Path

    from train.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "reasoning"
    configs = {kind: asdict(load_config(root / f"{task}-{kind}.yaml")) for kind in ("joint", "ebt", "llama")}
    assert configs["joint"]["model"]["ebt"]["joint_block_size"] == configs["joint"]["data"]["answer_block"]
    for cfg in configs.values():
        for key in ("kind", "recipe", "ebt"):
            cfg["model"].pop(key)
        cfg.pop("output_dir")
        cfg["eval"].pop("think_steps")
    assert configs["joint"] == configs["ebt"] == configs["llama"]
    assert configs["joint"]["data"]["answer_block"] and configs["joint"]["data"]["tasks"] == [task]


def test_block_contrastive_term_ranks_the_true_answer_below_corrupted_ones(tiny_config):
    """The loss is the cross-entropy of -summed block energies with the truth first (rebuilt by
    hand from the same draws), and one gradient step on it alone widens the mean margin between
    corrupted answers and the truth."""
    model = _joint(tiny_config, contrastive_weight=1.0, contrastive_negatives=4).train()
    prompt, true = _prompts(21, 4), _prompts(22, 4, M)
    z = torch.randn(4, M, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    one_hot = torch.nn.functional.one_hot

    def energy_fn():
        return model.model.block_energy_function(model.model.encode(prompt), M)

    torch.manual_seed(5)
    loss = model._block_contrastive_loss(energy_fn(), z, true, 1)
    torch.manual_seed(5)  # the same corruptions by hand
    blocks = [true, z.argmax(-1)]
    for _ in range(3):
        rate = torch.rand(4, 1)
        swap = torch.rand(4, M) < rate
        blocks.append(torch.where(swap, true.gather(1, torch.randint(0, M, (4, M))), true))
    with torch.no_grad():
        energy = energy_fn()
        energies = torch.stack([energy(one_hot(b, VOCAB).double(), 1).sum(-1) for b in blocks], -1)
    torch.testing.assert_close(loss.detach(), torch.nn.functional.cross_entropy(-energies, torch.zeros(4, dtype=torch.long)))

    def margin() -> torch.Tensor:
        with torch.no_grad():
            e = torch.stack([energy_fn()(one_hot(b, VOCAB).double(), 1).sum(-1) for b in blocks], -1)
        different = torch.stack([(b != true).any(-1) for b in blocks], -1)  # only really wrong answers count
        return ((e - e[:, :1]) * different).sum() / different.sum()

    before = margin()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert margin() > before, (before, margin())


def test_a_block_start_places_slot_j_at_a_fixed_position_whatever_the_prompt_length(tiny_config):
    """joint_block_start=k: slot j sits at RoPE position k + j, so with k = 1 slot 0 lines up with
    the prompt's second token (position 1) in a short and a long prompt alike; the default keeps
    the block right after the prompt."""
    fixed, after = _joint(tiny_config, joint_block_start=1).eval(), _joint(tiny_config).eval()
    for length in (3, 6):
        context = fixed.model.encode(_prompts(12, 2, length))
        assert fixed.model.block_positions(context, M).tolist() == [[1, 2, 3, 4]] * 2
        assert after.model.block_positions(context, M).tolist() == [list(range(length, length + M))] * 2
    # Same weights (same seed), so only the positions differ: the energies must too.
    prompt, probs = _prompts(13), _probs(14)
    e_fixed = fixed.model.block_energy_function(fixed.model.encode(prompt), M)(probs)
    e_after = after.model.block_energy_function(after.model.encode(prompt), M)(probs)
    assert (e_fixed - e_after).abs().max() > 1e-6
