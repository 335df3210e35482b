"""Training recipes as named presets of ``EBTConfig`` fields: the one place each recipe is defined.

Benchmarks, tests and run configs name a recipe instead of copying its knobs::

    EBTConfig(**RECIPES["s2"], vocab_size=65)            # in Python
    model: {kind: ebt, recipe: s2, ebt: {step_size: 4}}  # in a run config (train/config.py)

Fields a caller gives on top of a recipe override it. docs/design.md explains each knob.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # S1, the paper's "learns fast" recipe: 2 detached steps, alpha 500 learnable with its own
    # learning rate, loss averaged over the steps, one learned embedding per step (landscape).
    "s1": dict(
        update_rule="probability",
        step_size=500.0,
        step_size_learnable=True,
        step_size_lr_multiplier=1500.0,
        step_size_random_scale=1.0,
        train_steps=2,
        train_steps_max=None,
        langevin_noise=0.0,
        detach_between_steps=True,
        second_order="all",
        loss_on="all",
        step_embeddings=True,
    ),
    # S2, the paper's "gains from thinking" recipe: random 2-3 steps, alpha 5 fixed and drawn in
    # [alpha/2, 2 alpha] per position, Langevin noise 3 on the logits, steps not detached but only
    # the last one second order, loss on the last step, one landscape. The paper also replays past
    # final candidates as starts: a trainer setting (train.replay_buffer_size / replay_fraction).
    "s2": dict(
        update_rule="probability",
        step_size=5.0,
        step_size_learnable=False,
        step_size_lr_multiplier=1500.0,
        step_size_random_scale=2.0,
        train_steps=2,
        train_steps_max=3,
        langevin_noise=3.0,
        detach_between_steps=False,
        second_order="last",
        loss_on="last",
        step_embeddings=False,
    ),
    # Draft (text): a draft head (an LM head on the context stream with one own SwiGLU block,
    # trained with next-token cross-entropy) proposes the candidates; damped mirror steps
    # z <- (1 - alpha t) z + alpha t z_draft - alpha dE/dp with alpha 2, t 0.45 (a 0.9 pull towards
    # the draft per step) converge in 1-2 steps to z_draft - dE/dp / t, the draft corrected by the
    # energy. Random 1-4 steps from the draft plus noise, only the last step second order, loss on
    # the last step, one landscape. Thinking starts from the draft (steps=0 is the draft alone),
    # and past the trained count it stays at that fixed point (docs/thinking.md). One step is the
    # default: on tiny Shakespeare (6 runs) it is the best count or within 0.2% of it. A
    # context-only energy term fitted to the loss (calibration_offset) makes the energy's value a
    # loss estimate without touching its gradient; its small weight keeps it out of the clipping.
    "draft": dict(
        update_rule="mirror",
        step_size=2.0,
        step_size_learnable=False,
        step_size_lr_multiplier=1500.0,
        step_size_random_scale=1.0,
        train_steps=1,
        train_steps_max=4,
        langevin_noise=0.0,
        detach_between_steps=False,
        second_order="last",
        loss_on="last",
        step_embeddings=False,
        init_noise_scale=0.5,
        kl_weight=0.45,
        draft_head=True,
        draft_layers=1,
        calibration_weight=0.01,
        calibration_offset=True,
        inference_init="draft",
        inference_steps=1,
    ),
    # Attractor (joint mode, reasoning): answers as attractors of the descent, so that thinking past
    # the trained count keeps (or reaches) them. Mirror steps z <- z - alpha dE/dp with alpha 5 drawn
    # in [2.5, 10], random 1-3 steps with small path noise, only the last step second order, and
    # deep supervision: 3 segments per batch, each continuing the previous one's detached result
    # and scored; one landscape (no step embeddings), so any step count meets the same energy.
    # Thinking keeps only steps that lower a problem's energy (accept_decrease): on harder 4x4
    # Sudoku it is as good or better at every step count past the trained one, for all three seeds
    # (docs/reasoning.md), and longer thinking can then never raise the energy.
    "attractor": dict(
        update_rule="mirror",
        step_size=5.0,
        step_size_learnable=False,
        step_size_lr_multiplier=1500.0,
        step_size_random_scale=2.0,
        train_steps=1,
        train_steps_max=3,
        langevin_noise=1.0,
        detach_between_steps=False,
        second_order="last",
        loss_on="last",
        step_embeddings=False,
        train_segments=3,
        inference_accept_decrease=True,
    ),
}


def recipe(name: str, **overrides: Any) -> dict[str, Any]:
    """The ``EBTConfig`` fields of recipe ``name`` with ``overrides`` applied on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown EBT recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}.")
    return {**RECIPES[name], **overrides}


__all__ = ["RECIPES", "recipe"]
