"""``python -m eval thinking``: perplexity against thinking steps and random starts.

The question it answers: does more optimisation give better predictions? For every (steps,
samples) pair the EBT thinks over fixed windows of a text file (``think()``, best of ``samples``
random starts per position) and its perplexity is recorded with the energy passes it cost
(``samples * (2 * steps + 1)`` per token). A Transformer++ checkpoint (``--twin``) is scored on
the same windows once: one forward per token, no knob to turn, so it is a flat line.

With ``--ood-data`` the same is done on a second text, and the per-window mean energy is scored
as an out-of-distribution detector (AUROC, OOD = positive). For every setting the per-token
energy/loss correlation is reported too (energy as uncertainty), for the raw final energy and for
the energy relative to the uniform candidate on the same context (see ``eval.uncertainty``). With
``--rerank-top K`` the energy also acts as a verifier: the lowest-energy token among the K most
likely ones against the argmax (top-1 accuracy of both; ``--steps 0 --init draft`` re-ranks the
draft head's proposals). All numbers go through the local ``evaluate`` modules in ``eval/metrics``;
a JSON record and a PNG plot are written.

    python -m eval thinking --model runs/shakespeare_char_ebt_s2/final \\
        --twin runs/shakespeare_char_llama/final --data data/tinyshakespeare.txt \\
        --val-fraction 0.1 --ood-data data/wikitext2-valid.txt \\
        --steps 1,2,3,6,9,12 --samples 1,2,4,8 --output results/thinking.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ebt.configuration_ebt import ThinkingConfig
from eval.common import (
    UsageError,
    add_thinking_arguments,
    given_settings,
    load_checkpoint,
    markdown_table,
    thinking_settings,
)
from eval.metrics import load as load_metric
from eval.uncertainty import score_tokens

SWEEP = ("steps", "samples")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="EBT checkpoint folder (with its tokenizer)")
    parser.add_argument("--data", required=True, help="text file scored in distribution")
    parser.add_argument(
        "--val-fraction", type=_positive, default=1.0,
        help="score only the last FRACTION of --data's tokens (tiny Shakespeare's validation split: 0.1)",
    )  # fmt: skip
    parser.add_argument("--ood-data", help="a second text file, out of distribution: same curve, plus energy AUROC")
    parser.add_argument("--twin", help="Transformer++ checkpoint with the same tokenizer: its perplexity is the flat line")
    parser.add_argument("--block-size", type=int, default=None, help="window length (default: the model's context)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens scored per file (whole windows from its start)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward")
    parser.add_argument(
        "--rerank-top", type=int, default=0, metavar="K",
        help="also re-rank the K most likely tokens of every prediction by energy (K more passes per token; 0 = off)",
    )  # fmt: skip
    parser.add_argument("--output", default="results/thinking.json", help="JSON record; the plot goes beside it (.png)")
    add_thinking_arguments(parser, sweep=SWEEP, defaults={"steps": [1, 2, 3, 4, 6, 8, 12, 16], "samples": [1, 2, 4, 8]})


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


# ------------------------------------------------------------------------------------------ data


def windows(tokenizer: PreTrainedTokenizerBase, path: str, block: int, max_tokens: int, tail: float = 1.0) -> torch.Tensor:
    """Non-overlapping windows (N, block) of the file's tokens, from the start of its last ``tail``."""
    if not Path(path).is_file():
        raise UsageError(f"no such data file: {path}")
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[len(ids) - round(len(ids) * min(tail, 1.0)) :]
    n = min(len(ids), max_tokens) // block
    if n < 1:
        raise UsageError(f"{path} has {len(ids)} tokens to score: fewer than one window of {block}")
    return torch.tensor(ids[: n * block]).view(n, block)


# ------------------------------------------------------------------------------------ scoring


def score_ebt(
    model: PreTrainedModel, data: torch.Tensor, batch_size: int, thinking: ThinkingConfig, rerank_top: int = 0
) -> dict:
    """Per-token energy/NLL of every window under one thinking setting, plus its metrics."""
    scores = [score_tokens(model, batch, thinking, rerank_top=rerank_top) for batch in data.split(batch_size)]
    energy = torch.cat([s.energy for s in scores])  # (N, block - 1)
    relative = torch.cat([s.relative_energy for s in scores])
    nll = torch.cat([s.nll for s in scores])
    ppl = load_metric("perplexity").compute(nll_sum=nll.sum(1).tolist(), token_count=[nll.shape[1]] * len(nll))
    correlation = load_metric("energy_correlation")
    corr = correlation.compute(energy=energy.flatten().tolist(), loss=nll.flatten().tolist())
    corr_relative = correlation.compute(energy=relative.flatten().tolist(), loss=nll.flatten().tolist())
    rerank = {}
    if rerank_top > 0:
        targets = data[:, 1:]
        rerank = {
            "argmax_accuracy": float((torch.cat([s.argmax for s in scores]) == targets).double().mean()),
            "rerank_accuracy": float((torch.cat([s.reranked for s in scores]) == targets).double().mean()),
        }
    return {
        "perplexity": ppl["perplexity"],
        "nll_per_token": ppl["nll_per_token"],
        "tokens": ppl["tokens"],
        "function_evaluations": scores[0].function_evaluations,
        **rerank,
        "mean_steps_taken": float(torch.cat([s.steps_taken for s in scores]).double().mean()),
        "mean_energy": float(energy.double().mean()),
        "energy_loss_pearson": corr["pearson"],
        "energy_loss_spearman": corr["spearman"],
        "relative_energy_loss_pearson": corr_relative["pearson"],
        "relative_energy_loss_spearman": corr_relative["spearman"],
        # per window, for the OOD AUROC
        "window_energy": energy.double().mean(1).tolist(),
        "window_relative_energy": relative.double().mean(1).tolist(),
    }


def score_twin(model: PreTrainedModel, data: torch.Tensor, batch_size: int) -> dict:
    """Perplexity of an ordinary causal LM on the same windows: one forward per token."""
    sums = []
    with torch.no_grad():
        for batch in data.split(batch_size):
            logits = model(batch).logits[:, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            sums += nll.view(len(batch), -1).sum(1).tolist()
    ppl = load_metric("perplexity").compute(nll_sum=sums, token_count=[data.shape[1] - 1] * len(sums))
    return {
        "perplexity": ppl["perplexity"],
        "nll_per_token": ppl["nll_per_token"],
        "tokens": ppl["tokens"],
        "function_evaluations": 1,
    }


def _ood_auroc(metric, in_dist: dict, out_dist: dict) -> dict:
    """AUROC of mean window energy (raw and relative) with the OOD windows as positives."""
    result = {}
    for key, name in (("window_energy", "auroc_energy"), ("window_relative_energy", "auroc_relative_energy")):
        scores = in_dist[key] + out_dist[key]
        labels = [0] * len(in_dist[key]) + [1] * len(out_dist[key])
        result[name] = metric.compute(score=scores, is_ood=labels)["auroc"]
    return result


# ------------------------------------------------------------------------------------ report


def plot(record: dict, path: Path) -> None:
    """Perplexity against function evaluations: one line per samples, the twin flat, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in record["ebt"] if r["dataset"] == name]
        for samples in sorted({r["samples"] for r in rows}):
            line = sorted((r for r in rows if r["samples"] == samples), key=lambda r: r["steps"])
            ax.plot(
                [r["function_evaluations"] for r in line],
                [r["perplexity"] for r in line],
                "o-",
                label=f"EBT best of {samples}",
            )
            if samples == 1:
                for r in line:
                    ax.annotate(
                        str(r["steps"]),
                        (r["function_evaluations"], r["perplexity"]),
                        textcoords="offset points",
                        xytext=(3, 4),
                        fontsize=8,
                    )
        if name in record["twin"]:
            ax.axhline(record["twin"][name]["perplexity"], color="k", linestyle="--", label="Transformer++ (1 FE)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("function evaluations per token (log scale; labels: steps)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{name}: {Path(record['datasets'][name]['path']).name}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Thinking curve of {record['model']} (trained with {record['trained_steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(record: dict) -> str:
    """The record as markdown: one row per (dataset, setting), the twin's rows, the OOD AUROCs."""
    rows = [
        [r["dataset"], r["steps"], r["samples"], r["function_evaluations"], f"{r['perplexity']:.4f}",
         f"{r['mean_steps_taken']:.2f}", f"{r['energy_loss_spearman']:.3f}", f"{r['relative_energy_loss_spearman']:.3f}"]
        for r in record["ebt"]
    ]  # fmt: skip
    rows += [
        [name, "Transformer++ twin", "", t["function_evaluations"], f"{t['perplexity']:.4f}", "", "", ""]
        for name, t in record["twin"].items()
    ]
    header = [
        "dataset",
        "steps",
        "samples",
        "FE / token",
        "perplexity",
        "steps taken",
        "spearman(E, loss)",
        "spearman(E - E_unif, loss)",
    ]
    text = markdown_table(header, rows, right=range(1, 8))
    if record["rerank_top"]:
        rerank = [
            [r["dataset"], r["steps"], r["samples"], f"{100 * r['argmax_accuracy']:.2f}", f"{100 * r['rerank_accuracy']:.2f}"]
            for r in record["ebt"]
        ]
        text += f"\n\nTop-1 accuracy (%): argmax against the lowest energy among the top {record['rerank_top']}\n\n"
        text += markdown_table(["dataset", "steps", "samples", "argmax", "energy re-ranked"], rerank, right=range(1, 5))
    if record["auroc"]:
        auroc = [
            [r["steps"], r["samples"], f"{r['auroc_energy']:.3f}", f"{r['auroc_relative_energy']:.3f}"]
            for r in record["auroc"]
        ]
        text += "\n\nOOD AUROC of mean window energy\n\n" + markdown_table(
            ["steps", "samples", "raw energy", "relative energy"], auroc, right=range(4)
        )
    return text


def run(args: argparse.Namespace) -> dict:
    checkpoint = load_checkpoint(args.model, ebt=True)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    context = model.config.max_position_embeddings
    block = args.block_size or context
    if not 2 <= block <= context:
        raise UsageError(f"--block-size {block}: windows must hold 2 to {context} tokens (the model's context)")
    if args.batch_size < 1 or args.max_tokens < block:
        raise UsageError("--batch-size must be >= 1 and --max-tokens at least one window (--block-size)")
    if args.rerank_top < 0:
        raise UsageError(f"--rerank-top {args.rerank_top}: give the number of tokens to re-rank (>= 1), or 0 for none")
    data = {"id": windows(tokenizer, args.data, block, args.max_tokens, args.val_fraction)}
    sources = {"id": {"path": args.data, "val_fraction": args.val_fraction}}
    if args.ood_data:
        data["ood"] = windows(tokenizer, args.ood_data, block, args.max_tokens)
        sources["ood"] = {"path": args.ood_data, "val_fraction": 1.0}
    for name, d in data.items():
        sources[name].update(windows=d.shape[0], block_size=block, tokens_scored=d.shape[0] * (block - 1))

    twin_scores = {}
    if args.twin:
        twin = load_checkpoint(args.twin, ebt=False, flag="--twin")
        if twin.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"--twin {args.twin} has a different tokenizer from --model: perplexities would not compare")
        twin_scores = {name: score_twin(twin.model, d, args.batch_size) for name, d in data.items()}

    settings = thinking_settings(args)
    rows, auroc = [], []
    metric = load_metric("energy_auroc")
    for thinking in settings:
        steps, samples = thinking.steps, thinking.samples
        started = time.time()
        per_data = {name: score_ebt(model, d, args.batch_size, thinking, args.rerank_top) for name, d in data.items()}
        for name, result in per_data.items():
            rows.append(
                {
                    "dataset": name,
                    "steps": steps,
                    "samples": samples,
                    **{k: v for k, v in result.items() if not k.startswith("window_")},
                }
            )
        if "ood" in per_data:
            auroc.append({"steps": steps, "samples": samples, **_ood_auroc(metric, per_data["id"], per_data["ood"])})
        ppl = ", ".join(f"{name} {r['perplexity']:.4f}" for name, r in per_data.items())
        print(f"steps {steps!s:>3} samples {samples!s:>2}: perplexity {ppl} ({time.time() - started:.0f} s)", file=sys.stderr)
    fixed = {k: v for k, v in given_settings(settings[0]).items() if k not in SWEEP}
    return {
        "args": vars(args),
        "model": args.model,
        "twin_model": args.twin,
        "trained_steps": model.config.trained_steps,
        "think": fixed,  # the settings every row shares; unset ones are the checkpoint's (config.inference_*)
        "checkpoint_thinking": model.config.thinking_config.to_dict(),
        "datasets": sources,
        "ebt": rows,
        "twin": twin_scores,
        "auroc": auroc,
        "rerank_top": args.rerank_top,
    }


def main(args: argparse.Namespace) -> int:
    record = run(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2))
    plot(record, output.with_suffix(".png"))
    print(tables(record))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0
