"""``python -m eval reasoning``: exact-match accuracy on the reasoning tasks against thinking.

For every task, split and thinking setting (inner steps x random starts) the EBT answers every
prompt greedily and the answer is checked by ``ebt.tasks.check_answer`` (which re-derives the
truth from the prompt, so the scorer shares no code with the generators). A Transformer++ twin,
given with ``--twin``, is scored the same way once per split: it has no thinking knobs.

How a prompt is fed (why it matches training): the trainer packs ``prompt + answer + EOS``
examples back to back, so every training prompt follows an EOS token. Here each prompt is
likewise preceded by one EOS, left-padded into batches, and generation runs greedily until EOS.
An answer counts only if the model ends it with EOS within the budget (longest reference answer
+ 1 tokens), so the budget can never turn a longer wrong answer into a right one.

``--model``/``--twin`` may contain ``{task}``, so one command evaluates one model per task:

    python -m eval reasoning --task addition,dyck --model 'runs/reasoning/{task}-ebt/final' \\
        --twin 'runs/reasoning/{task}-llama/final' --output results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ebt.tasks import TASK_NAMES, check_answer, make_task

SPLITS = ("train", "validation", "test", "harder")


@dataclass
class Checkpoint:
    """A loaded model folder. ``is_ebt`` decides whether thinking settings apply."""

    label: str
    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def is_ebt(self) -> bool:
        return self.model.config.model_type == "ebt"


class Generated(NamedTuple):
    """One greedy answer: the text before EOS, and whether EOS came within the budget."""

    text: str
    finished: bool


def load(path: str, label: str | None = None) -> Checkpoint:
    """Model + tokenizer from a saved folder (EBT or Llama, told apart by ``config.model_type``)."""
    import ebt  # noqa: F401  (registers the "ebt" model type with the Auto classes)

    if not Path(path, "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json); pass e.g. runs/NAME/final")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token: answers could not be told where to stop")
    if label is None:
        label = "EBT" if model.config.model_type == "ebt" else "Transformer++"
    return Checkpoint(label=label, path=path, model=model, tokenizer=tokenizer)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of ``EOS + prompt`` (see the module docstring); refuses characters it never saw."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    for prompt, row in zip(prompts, ids):
        if unk is not None and unk in row:
            raise ValueError(
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
    think_steps: int | None = None,
    think_samples: int | None = None,
) -> list[Generated]:
    """Greedy answers to ``prompts``, batched with left padding (prompts of similar length together).

    ``think_steps``/``think_samples`` go to the EBT's ``generate``; they must be None for a
    model without thinking.
    """
    model, tok = checkpoint.model, checkpoint.tokenizer
    think = {}
    if think_steps is not None or think_samples is not None:
        if not checkpoint.is_ebt:
            raise ValueError(f"{checkpoint.path} is not an EBT: thinking settings do not apply to it")
        think = {"think_steps": think_steps, "think_samples": think_samples}
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
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                **think,
            )
        for i, new in zip(rows, out[:, width:].tolist()):
            finished = eos in new
            answers[i] = Generated(tok.decode(new[: new.index(eos)] if finished else new), finished)
    return answers  # type: ignore[return-value]


def score(task: str, prompts: list[str], answers: list[Generated]) -> list[bool]:
    """Exact match by the task's own checker; an answer without EOS is wrong."""
    return [a.finished and check_answer(task, p, a.text) for p, a in zip(prompts, answers)]


def answer_budget(tokenizer: PreTrainedTokenizerBase, references: list[str]) -> int:
    """New tokens allowed: the longest reference answer plus its EOS."""
    return max(len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]) + 1


def evaluate(
    checkpoint: Checkpoint,
    task: str,
    split: str,
    data: dict[str, list],
    settings: list[tuple[int, int]],
    batch_size: int,
) -> list[dict]:
    """One result row per thinking setting (EBT) or a single row (a model that cannot think)."""
    prompts = data["prompt"]
    budget = answer_budget(checkpoint.tokenizer, data["answer"])
    rows = []
    for steps, samples in settings if checkpoint.is_ebt else [(None, None)]:
        t0 = time.perf_counter()
        answers = greedy_answers(
            checkpoint, prompts, max_new_tokens=budget, batch_size=batch_size, think_steps=steps, think_samples=samples
        )
        correct = score(task, prompts, answers)
        by_level: dict[int, list[bool]] = {}
        for level, ok in zip(data["difficulty"], correct):
            by_level.setdefault(level, []).append(ok)
        rows.append(
            {
                "task": task,
                "model": checkpoint.label,
                "path": checkpoint.path,
                "split": split,
                "steps": steps,
                "samples": samples,
                # energy passes per generated token: each step is one forward + backward, plus the final energy
                "energy_passes": samples * (2 * steps + 1) if steps else None,
                "accuracy": sum(correct) / len(correct),
                "correct": sum(correct),
                "total": len(correct),
                "accuracy_by_difficulty": {str(k): sum(v) / len(v) for k, v in sorted(by_level.items())},
                "seconds": round(time.perf_counter() - t0, 2),
                "outputs": [a.text for a in answers],
                "no_eos": [i for i, a in enumerate(answers) if not a.finished],  # these count as wrong
            }
        )
        tag = f"steps={steps} samples={samples}" if steps else "one pass"
        print(f"{task} {split} {checkpoint.label} {tag}: {rows[-1]['accuracy']:.1%}", file=sys.stderr)
    return rows


def markdown_table(results: list[dict]) -> str:
    """Accuracy (%) per split as columns; one row per task, model and thinking setting."""
    splits = list(dict.fromkeys(r["split"] for r in results))
    cells: dict[tuple, dict[str, float]] = {}
    for r in results:
        cells.setdefault((r["task"], r["model"], r["steps"], r["samples"], r["energy_passes"]), {})[r["split"]] = r["accuracy"]
    head = ["task", "model", "steps", "samples", "energy passes / token"] + [f"{s} acc. (%)" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, model, steps, samples, passes), acc in cells.items():
        keys = [task, model] + ["-" if v is None else str(v) for v in (steps, samples, passes)]
        values = [f"{100 * acc[s]:.1f}" if s in acc else "" for s in splits]
        lines.append("| " + " | ".join(keys + values) + " |")
    return "\n".join(lines)


def _csv(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _positive_ints(text: str) -> list[int]:
    values = _csv(int)(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (EBT or Llama); may contain {task}")
    parser.add_argument("--twin", help="a Transformer++ (or any second) model folder; may contain {task}")
    parser.add_argument("--task", type=_csv(str), required=True, help=f"task(s), comma-separated: {', '.join(TASK_NAMES)}")
    parser.add_argument("--split", type=_csv(str), default=["test", "harder"], help="split(s), comma-separated (default test,harder)")
    parser.add_argument("--steps", type=_positive_ints, default=[1, 2, 4, 8], help="EBT thinking steps to sweep (default 1,2,4,8)")
    parser.add_argument("--samples", type=_positive_ints, default=[1, 2, 4], help="EBT random starts to sweep (default 1,2,4)")
    parser.add_argument("--num-examples", type=int, default=500, help="problems per split (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation problems (default 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per generate() call (default 128)")
    parser.add_argument("--output", help="write every result row (with all answers) to this JSON file")


def main(args: argparse.Namespace) -> int:
    bad = [t for t in args.task if t not in TASK_NAMES] + [s for s in args.split if s not in SPLITS]
    if bad:
        print(f"error: unknown task/split {bad}; tasks: {', '.join(TASK_NAMES)}; splits: {', '.join(SPLITS)}", file=sys.stderr)
        return 2
    if args.num_examples < 1 or args.batch_size < 1:
        print("error: --num-examples and --batch-size must be >= 1", file=sys.stderr)
        return 2
    settings = [(steps, samples) for steps in args.steps for samples in args.samples]
    results: list[dict] = []
    try:
        for task in args.task:
            checkpoints = [load(args.model.replace("{task}", task))]
            if args.twin:
                twin = load(args.twin.replace("{task}", task))
                if twin.label == checkpoints[0].label:
                    twin.label += " (--twin)"
                checkpoints.append(twin)
            for split in args.split:
                data = make_task(task, split, args.num_examples, seed=args.seed).to_dict()
                for checkpoint in checkpoints:
                    results += evaluate(checkpoint, task, split, data, settings, args.batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown_table(results)
    print(table)
    if args.output:
        meta = {"num_examples": args.num_examples, "seed": args.seed, "command": " ".join(sys.argv)}
        Path(args.output).write_text(json.dumps({**meta, "table": table, "results": results}, indent=1))
    return 0
