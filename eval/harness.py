"""``python -m eval harness``: lm-evaluation-harness tasks swept over thinking settings, one table.

    python -m eval harness --model runs/default/final --tasks ebt_reasoning_mc,ebt_text_ppl \\
        --text-file data/tinyshakespeare.txt --think-steps 1,2,4 --limit 200

The model is loaded once as the ``ebt`` lm-eval model (``eval.lm_eval_ebt``) and every task is
evaluated at every (steps, samples) setting (``--think-steps``/``--think-samples``, comma lists);
every other ``ThinkingConfig`` setting has its ``--think-<field>`` flag too and is the same in
every column. The table has one row per task and metric and one column per setting. The
project's local tasks (``eval/tasks``: ``ebt_<task>``, ``ebt_<task>_mc``, the tags
``ebt_reasoning`` / ``ebt_reasoning_mc``, and ``ebt_text_ppl``) need no Hub; lm-eval's built-in
task index is only read when a task is not found locally, because reading it takes tens of
seconds on a small machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eval.common import (
    UsageError,
    add_thinking_arguments,
    comma_list,
    given_settings,
    markdown_table,
    setting_label,
    thinking_settings,
)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


SWEEP = ("steps", "samples")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (e.g. OUTPUT/final) or Hub name")
    parser.add_argument("--tasks", type=comma_list(str), required=True, help="comma-separated lm-eval tasks, tags or groups")
    parser.add_argument("--text-file", default=None, help="local text file of ebt_text_ppl (one document per paragraph)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--include-path", action="append", default=[], help="more task folders (repeatable)")
    parser.add_argument("--output", type=Path, default=None, help="write the table and every result to this JSON file")
    add_thinking_arguments(parser, sweep=SWEEP)


def task_manager(tasks: list[str], include_paths: list[str], metadata: dict[str, Any]):
    """The local tasks only, unless a requested task is not among them (then lm-eval's own too)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *include_paths]
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(local.match_tasks([name]) for name in tasks):
        return local
    return TaskManager(include_path=paths, metadata=metadata)


def metric_rows(results: dict) -> dict[tuple[str, str], float]:
    """{(task, metric): value} from lm-eval's results, metric names marked with ↑/↓, stderrs dropped."""
    rows = {}
    for task, metrics in sorted(results["results"].items()):
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # metrics are "name,filter"; alias, sample_len are not
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            arrow = {True: " ↑", False: " ↓"}.get(better.get(metric), "")
            name = metric + (f" ({filt})" if filt and filt != "none" else "") + arrow
            rows[(task, name)] = float(value)
    return rows


def results_table(columns: dict[str, dict[tuple[str, str], float]]) -> str:
    """Rows task x metric, one column per thinking setting."""
    keys = sorted({k for rows in columns.values() for k in rows})
    rows = [
        [task, metric, *(f"{c[(task, metric)]:.4g}" if (task, metric) in c else "" for c in columns.values())]
        for task, metric in keys
    ]
    return markdown_table(["task", "metric", *columns], rows, right=range(2, 2 + len(columns)))


def main(args: argparse.Namespace) -> int:
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from eval.lm_eval_ebt import EBTLM

    tasks = args.tasks
    if Path(args.model).exists() and not Path(args.model, "config.json").is_file():
        raise UsageError(f"--model {args.model} is not a model folder (no config.json); pass e.g. runs/NAME/final")
    metadata = {"text_file": args.text_file} if args.text_file else {}
    manager = task_manager(tasks, args.include_path, metadata)
    settings = thinking_settings(args)
    lm = EBTLM(pretrained=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    columns, raw = {}, {}
    for thinking in settings:
        lm.thinking = thinking
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit, log_samples=False)
        label = setting_label(thinking, SWEEP)
        columns[label] = metric_rows(results)
        raw[label] = {k: results[k] for k in ("results", "higher_is_better", "n-samples") if k in results}
    table = results_table(columns)
    print(f"\n{args.model}: {', '.join(tasks)}" + (f" (limit {args.limit:g})" if args.limit else "") + "\n")
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        fixed = {k: v for k, v in given_settings(settings[0]).items() if k not in SWEEP}
        report = {"model": args.model, "tasks": tasks, "limit": args.limit, "thinking": fixed, "table": table, "results": raw}
        args.output.write_text(json.dumps(report, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return 0
