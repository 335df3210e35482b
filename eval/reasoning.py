"""``python -m eval reasoning``: exact-match accuracy on the reasoning tasks against thinking.

For every task, split and thinking setting (inner steps x random starts x constraint weight) the
EBT answers every prompt greedily and the answer is checked by ``ebt.tasks.check_answer`` (which
re-derives the truth from the prompt, so the scorer shares no code with the generators). A
Transformer++ twin, given with ``--twin``, is scored the same way once per split: it has no
thinking knobs.

How a prompt is fed (why it matches training): the trainer packs ``prompt + answer + EOS``
examples back to back (or, with ``data.answer_block``, puts one ``EOS + prompt`` per row before
its answer block), so every training prompt follows an EOS token. Here each prompt is likewise
preceded by one EOS, left-padded into batches, and generation runs greedily until EOS: token by
token for an autoregressive EBT or the twin; for a joint-mode EBT (``joint_block_size`` m > 0)
block by block, each block of m tokens thought about together and emitted at once. An answer
counts only if the model ends it with EOS within the budget (longest reference answer + 1
tokens), so the budget can never turn a longer wrong answer into a right one; a budget longer
than a block simply takes more blocks.

``--constraint-weight`` (a swept list, default 0) adds the task's hand-written constraint energy
(``ebt.energies.task_energy``: the rules of Sudoku, a sorted permutation) with that weight to the
model's energy in every inner step, a product of experts. The energy scores a whole answer read
from the first position of a block, so a weight > 0 needs a joint-mode EBT whose block holds the
longest answer and its EOS, on a task that has such an energy; the twin ignores it.

Besides accuracy every EBT row reports the inner steps spent: per problem, the mean of
``generate``'s ``steps_taken`` over its answer's tokens (see ``Generated``), averaged overall
(``mean_steps``) and per difficulty. It equals ``steps`` unless ``--tolerance`` stops a problem
early or ``--accept-decrease`` undoes a step: with ``--tolerance X --halting residual`` (or
``energy``) a problem stops once a step barely changes it, and the per-difficulty means show
whether easy problems stop earlier than hard ones.

``--model``/``--twin`` may contain ``{task}``, so one command evaluates one model per task:

    python -m eval reasoning --task addition,dyck --model 'runs/reasoning/{task}-ebt/final' \\
        --twin 'runs/reasoning/{task}-llama/final' --output results.json
    python -m eval reasoning --task sudoku --model runs/reasoning/sudoku-joint/final \\
        --steps 4,16 --samples 1 --constraint-weight 0,1,10 --tolerance 1e-3 --halting residual
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from ebt.configuration_ebt import ThinkingConfig
from ebt.energies import TASKS_WITH_ENERGY, EnergyTerm, task_energy
from ebt.tasks import SPLITS, TASK_NAMES, check_answer, make_task
from eval.common import (
    Checkpoint,
    UsageError,
    add_thinking_arguments,
    comma_list,
    given_settings,
    load_checkpoint,
    markdown_table,
    thinking_settings,
)


class Generated(NamedTuple):
    """One greedy answer: the text before EOS, whether EOS came within the budget, and the inner
    steps spent on it (EBT only, else None).

    ``steps`` is the mean of ``generate``'s ``steps_taken`` over the answer's generated tokens up
    to and including its EOS (all budget tokens if it never ended), so padding after EOS, where
    generate spends nothing, cannot dilute it. For an autoregressive EBT each token counts its own
    inner loop; in the joint mode every token of a block carries its problem's count for that
    block, so a one-block answer gets exactly that count and a longer one the token-weighted mean
    over its blocks. With several samples it is the chosen start's count; steps undone by
    ``accept_decrease`` are not counted.
    """

    text: str
    finished: bool
    steps: float | None = None


def load(path: str, flag: str = "--model") -> Checkpoint:
    """Model + tokenizer from a saved folder (EBT or Llama, told apart by ``config.model_type``)."""
    checkpoint = load_checkpoint(path, flag=flag)
    if checkpoint.tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer in {path} has no EOS token: answers could not be told where to stop")
    return checkpoint


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of ``EOS + prompt`` (see the module docstring); refuses characters it never saw."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    for prompt, row in zip(prompts, ids):
        if unk is not None and unk in row:
            raise UsageError(
                f"the tokenizer maps part of the prompt {prompt!r} to {tokenizer.unk_token!r}: "
                "the model was not trained on this task's characters (wrong --task or --model?)"
            )
    return [[tokenizer.eos_token_id] + row for row in ids]


def greedy_answers(
    checkpoint: Checkpoint,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    thinking: ThinkingConfig | None = None,
    energy_terms: Sequence[tuple[float, EnergyTerm]] = (),
) -> list[Generated]:
    """Greedy answers to ``prompts``, batched with left padding (prompts of similar length together).

    ``thinking`` and ``energy_terms`` go to the EBT's ``generate``; they must be unset for a model
    without thinking. An EBT is asked for ``return_dict_in_generate`` to read the steps it spent
    (``Generated.steps``). The length limit is passed as ``max_length`` (prompt width +
    ``max_new_tokens``), the quantity a checkpoint's generation config also sets: passing
    ``max_new_tokens`` next to it would make ``transformers`` warn on every call that both are set.
    """
    model, tok = checkpoint.model, checkpoint.tokenizer
    think: dict = {}
    if checkpoint.can_think:
        think = {"return_dict_in_generate": True}
        if thinking is not None:
            think["thinking"] = thinking
        if energy_terms:
            think["energy_terms"] = list(energy_terms)
    elif thinking is not None or energy_terms:
        raise UsageError(f"{checkpoint.path} is not an EBT: thinking settings and energy terms do not apply to it")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    encoded = encode_prompts(tok, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[Generated | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in rows])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows])
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=mask,
                max_length=width + max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                **think,
            )
        sequences = out.sequences if checkpoint.can_think else out
        taken = out.steps_taken.tolist() if checkpoint.can_think else [None] * len(rows)
        for i, new, spent in zip(rows, sequences[:, width:].tolist(), taken):
            finished = eos in new
            length = new.index(eos) + 1 if finished else len(new)  # the answer's tokens, EOS included
            steps = sum(spent[:length]) / length if spent is not None else None
            answers[i] = Generated(tok.decode(new[: length - 1] if finished else new), finished, steps)
    return answers  # type: ignore[return-value]


def score(task: str, prompts: list[str], answers: list[Generated]) -> list[bool]:
    """Exact match by the task's own checker; an answer without EOS is wrong."""
    return [a.finished and check_answer(task, p, a.text) for p, a in zip(prompts, answers)]


def answer_budget(tokenizer: PreTrainedTokenizerBase, references: list[str]) -> int:
    """New tokens allowed: the longest reference answer plus its EOS."""
    return max(len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]) + 1


def constraint_term(
    checkpoint: Checkpoint, task: str, weights: Sequence[float], splits: dict[str, dict[str, list]]
) -> EnergyTerm | None:
    """The task's constraint energy for ``checkpoint`` if any of ``weights`` is > 0, else None.

    Refuses (``UsageError``) what the energy cannot score, before any evaluation runs: an
    autoregressive EBT (its inner loop sees one token, the energy a whole answer), a task without
    a built-in energy, and a joint block shorter than an answer of ``splits`` plus its EOS (the
    energy reads the answer from a block's first position, so a second block would be misread).
    A model that cannot think gets None: it is evaluated once, without the energy.
    """
    if not checkpoint.can_think or not any(w > 0 for w in weights):
        return None
    flag = f"--constraint-weight {','.join(f'{w:g}' for w in weights)}"
    block = checkpoint.model.config.joint_block_size
    if not block:
        raise UsageError(
            f"{flag}: {checkpoint.path} is an autoregressive EBT (joint_block_size=0), but the constraint energy scores a "
            "whole answer block at once: it needs an EBT in the joint continuation mode (e.g. "
            "configs/reasoning/sudoku-joint.yaml); evaluate this checkpoint with --constraint-weight 0"
        )
    try:
        term = task_energy(task, checkpoint.tokenizer)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None
    for split, data in splits.items():
        budget = answer_budget(checkpoint.tokenizer, data["answer"])
        if budget > block:
            raise UsageError(
                f"{flag}: {checkpoint.path} thinks in blocks of joint_block_size={block} tokens, but the longest {task} "
                f"{split} answer and its EOS take {budget}; the constraint energy reads the answer from a block's first "
                "position, so the whole answer must fit one block. Leave that split out, use --constraint-weight 0, or a "
                f"checkpoint with joint_block_size >= {budget}"
            )
    return term


def evaluate(
    checkpoint: Checkpoint,
    task: str,
    split: str,
    data: dict[str, list],
    settings: list[ThinkingConfig],
    batch_size: int,
    weights: Sequence[float] = (0.0,),
    constraint: EnergyTerm | None = None,
) -> list[dict]:
    """One result row per constraint weight x thinking setting (EBT), or a single row (a model
    that cannot think). A weight > 0 adds ``constraint`` (see ``constraint_term``) with that weight."""
    prompts = data["prompt"]
    budget = answer_budget(checkpoint.tokenizer, data["answer"])
    runs = [(w, t) for w in weights for t in settings] if checkpoint.can_think else [(None, None)]
    rows = []
    for weight, thinking in runs:
        if weight and constraint is None:
            raise ValueError(f"constraint weight {weight:g} given without the constraint term (see constraint_term)")
        steps, samples = (thinking.steps, thinking.samples) if thinking is not None else (None, None)
        t0 = time.perf_counter()
        answers = greedy_answers(
            checkpoint,
            prompts,
            max_new_tokens=budget,
            batch_size=batch_size,
            thinking=thinking,
            energy_terms=[(weight, constraint)] if weight else [],
        )
        correct = score(task, prompts, answers)
        by_level: dict[int, list[int]] = {}
        for i, level in enumerate(data["difficulty"]):
            by_level.setdefault(level, []).append(i)
        levels = sorted(by_level.items())
        spent = [a.steps for a in answers] if checkpoint.can_think else None
        rows.append(
            {
                "task": task,
                "model": checkpoint.label,
                "path": checkpoint.path,
                "split": split,
                "constraint_weight": weight,
                "steps": steps,
                "samples": samples,
                # energy passes per generated token: each step is one forward + backward, plus the final energy
                "energy_passes": samples * (2 * steps + 1) if steps is not None and samples is not None else None,
                "accuracy": sum(correct) / len(correct),
                "correct": sum(correct),
                "total": len(correct),
                "accuracy_by_difficulty": {str(k): fmean(correct[i] for i in v) for k, v in levels},
                # inner steps spent per problem (Generated.steps), their mean, and the mean per difficulty
                "mean_steps": fmean(spent) if spent else None,
                "mean_steps_by_difficulty": {str(k): fmean(spent[i] for i in v) for k, v in levels} if spent else None,
                "steps_spent": spent,
                "seconds": round(time.perf_counter() - t0, 2),
                "outputs": [a.text for a in answers],
                "no_eos": [i for i, a in enumerate(answers) if not a.finished],  # these count as wrong
            }
        )
        tag = f"steps={steps} samples={samples} constraint weight={weight:g}" if thinking is not None else "one pass"
        spent_text = "" if spent is None else f", mean steps {rows[-1]['mean_steps']:.2f}"
        print(f"{task} {split} {checkpoint.label} {tag}: {rows[-1]['accuracy']:.1%}{spent_text}", file=sys.stderr)
    return rows


def results_table(results: list[dict]) -> str:
    """Accuracy (%) per split as columns, then the mean inner steps per split (when a row has
    them: EBT rows); one row per task, model, constraint weight and thinking setting. The
    constraint weight column appears only when some row used a weight > 0, so a plain sweep
    keeps its narrow table."""
    splits = list(dict.fromkeys(r["split"] for r in results))
    show_weight = any(r.get("constraint_weight") for r in results)
    show_steps = any(r.get("mean_steps") is not None for r in results)
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results:
        weight = r.get("constraint_weight")
        keys = (r["task"], r["model"], *([None if weight is None else f"{weight:g}"] if show_weight else []))
        cells.setdefault((*keys, r["steps"], r["samples"], r["energy_passes"]), {})[r["split"]] = r
    header = ["task", "model", *(["constraint weight"] if show_weight else []), "steps", "samples", "energy passes / token"]
    header += [f"{s} acc. (%)" for s in splits] + ([f"{s} mean steps" for s in splits] if show_steps else [])
    rows = []
    for keys, by_split in cells.items():
        accuracy = [f"{100 * by_split[s]['accuracy']:.1f}" if s in by_split else "" for s in splits]
        spent = [by_split[s].get("mean_steps") if s in by_split else "" for s in splits] if show_steps else []
        rows.append([*keys, *accuracy, *(f"{x:.2f}" if isinstance(x, float) else x for x in spent)])
    return markdown_table(header, rows, right=range(2, len(header)))


SWEEP = ("steps", "samples")


def constraint_weight(text: str) -> float:
    """One ``--constraint-weight`` value: a finite number (the >= 0 check is ``comma_list``'s)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text!r}")
    return value


constraint_weight.__name__ = "finite number"  # comma_list names the expected kind after it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (EBT or Llama); may contain {task}")
    parser.add_argument("--twin", help="a Transformer++ (or any second) model folder; may contain {task}")
    parser.add_argument(
        "--task", type=comma_list(str), required=True, help=f"task(s), comma-separated: {', '.join(TASK_NAMES)}"
    )
    parser.add_argument(
        "--split", type=comma_list(str), default=["test", "harder"], help="split(s), comma-separated (default test,harder)"
    )
    parser.add_argument("--num-examples", type=int, default=500, help="problems per split (default 500)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the evaluation problems (default 0); thinking's is --think-seed"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per generate() call (default 128)")
    parser.add_argument(
        "--constraint-weight",
        type=comma_list(constraint_weight, minimum=0),
        default=[0.0],
        metavar="WEIGHTS",
        help="weight(s) of the task's constraint energy (ebt.energies) added to the EBT's energy while it thinks, "
        "comma-separated, swept with --steps and --samples (default 0 = none). A weight > 0 needs a joint-mode EBT "
        "(joint_block_size > 0) whose block holds the whole answer and its EOS, on a task with one "
        f"({', '.join(TASKS_WITH_ENERGY)}); the twin is evaluated once without it",
    )
    parser.add_argument("--output", help="write every result row (with all answers and steps spent) to this JSON file")
    add_thinking_arguments(parser, sweep=SWEEP, defaults={"steps": [1, 2, 4, 8], "samples": [1, 2, 4]})


def main(args: argparse.Namespace) -> int:
    bad = [t for t in args.task if t not in TASK_NAMES] + [s for s in args.split if s not in SPLITS]
    if bad:
        raise UsageError(f"unknown task/split {bad}; tasks: {', '.join(TASK_NAMES)}; splits: {', '.join(SPLITS)}")
    if args.num_examples < 1 or args.batch_size < 1:
        raise UsageError("--num-examples and --batch-size must be >= 1")
    settings = thinking_settings(args)
    weights = list(dict.fromkeys(args.constraint_weight))
    # Load and check everything first, so a setting that cannot run fails before hours of evaluation.
    plan = []
    for task in args.task:
        checkpoints = [load(args.model.replace("{task}", task))]
        if args.twin:
            twin = load(args.twin.replace("{task}", task), flag="--twin")
            if twin.label == checkpoints[0].label:
                twin.label += " (--twin)"
            checkpoints.append(twin)
        splits = {split: make_task(task, split, args.num_examples, seed=args.seed).to_dict() for split in args.split}
        plan.append((task, splits, [(c, constraint_term(c, task, weights, splits)) for c in checkpoints]))
    results: list[dict] = []
    for task, splits, models in plan:
        for split, data in splits.items():
            for checkpoint, constraint in models:
                results += evaluate(checkpoint, task, split, data, settings, args.batch_size, weights, constraint)
    table = results_table(results)
    print(table)
    if args.output:
        fixed = {k: v for k, v in given_settings(settings[0]).items() if k not in SWEEP}
        meta = {
            "num_examples": args.num_examples,
            "seed": args.seed,
            "thinking": fixed,
            "constraint_weights": weights,
            "command": " ".join(sys.argv),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({**meta, "table": table, "results": results}, indent=1))
    return 0
