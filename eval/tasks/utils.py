"""Datasets and scoring for the local lm-evaluation-harness tasks in this folder (no Hub).

lm-eval calls the ``custom_dataset`` functions named in the YAMLs as
``fn(**metadata, **dataset_kwargs)``; ``metadata`` holds the YAML's ``metadata``, every model
argument and the ``--metadata`` JSON of the command line, so these functions take their own
settings by distinctive names and ignore the rest (``**_``).

- reasoning tasks (``ebt.tasks``): built in memory from the seeded generators, so every run and
  machine scores the same problems; the multiple-choice variant adds wrong answers that differ
  from the true one by one character (one substituted or two neighbours swapped), each checked
  to be wrong with ``ebt.tasks.check_answer``, so the choices have the answer's length and a
  model cannot win by preferring short strings;
- text perplexity: a local text file given as ``text_file`` (``--metadata '{"text_file": ...}'``
  or ``python -m eval harness --text-file``), one document per blank-line-separated paragraph.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import datasets

from ebt.tasks import check_answer, make_task

CHOICES = 4  # the true answer plus at most three wrong ones


def reasoning_dataset(
    task_name: str, task_split: str = "test", num_examples: int = 200, task_seed: int = 0, **_: Any
) -> datasets.DatasetDict:
    """``num_examples`` problems of ``task_name`` (columns task, prompt, answer, difficulty)."""
    ds = make_task(task_name, task_split, num_examples, seed=task_seed)
    return datasets.DatasetDict({"test": ds.add_column("task", [task_name] * len(ds))})


def reasoning_choices_dataset(
    task_name: str, task_split: str = "test", num_examples: int = 200, task_seed: int = 0, **_: Any
) -> datasets.DatasetDict:
    """``reasoning_dataset`` plus ``choices`` (true answer among wrong ones) and ``label``."""
    ds = reasoning_dataset(task_name, task_split, num_examples, task_seed)["test"]
    alphabet = sorted(set("".join(ds["answer"])))

    def add_choices(doc: dict) -> dict:
        rng = random.Random(f"{task_name}|{doc['prompt']}")
        choices = [doc["answer"]] + wrong_answers(task_name, doc["prompt"], doc["answer"], alphabet, rng)
        rng.shuffle(choices)
        return {"choices": choices, "label": choices.index(doc["answer"])}

    return datasets.DatasetDict({"test": ds.map(add_choices)})


def wrong_answers(task: str, prompt: str, answer: str, alphabet: list[str], rng: random.Random) -> list[str]:
    """Up to ``CHOICES - 1`` distinct one-edit corruptions of ``answer`` that ``check_answer`` rejects."""
    edits = {answer[:i] + c + answer[i + 1 :] for i in range(len(answer)) for c in alphabet}
    edits |= {answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :] for i in range(len(answer) - 1)}
    wrong = sorted(e for e in edits if e != answer and not check_answer(task, prompt, e))
    return rng.sample(wrong, min(CHOICES - 1, len(wrong)))


def score_generation(doc: dict, results: list[str]) -> dict[str, float]:
    """Accuracy of a generated answer by the task's own checker (Sudoku accepts any valid board)."""
    return {"acc": float(check_answer(doc["task"], doc["prompt"], results[0]))}


def text_documents(text_file: str | None = None, **_: Any) -> datasets.DatasetDict:
    """The paragraphs of a local text file (split at blank or whitespace-only lines, stripped, non-empty)."""
    if not text_file:
        raise ValueError(
            'ebt_text_ppl needs a local text file: pass --metadata \'{"text_file": "PATH"}\' to lm_eval, '
            "or --text-file PATH to python -m eval harness"
        )
    path = Path(text_file).expanduser()
    if not path.is_file():
        raise ValueError(f"ebt_text_ppl: text_file {str(path)!r} is not a file")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": [p for p in paragraphs if p]})})
