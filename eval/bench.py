"""``python -m eval bench``: what energy-based thinking costs against Transformer++, in one run.

Everything is measured in one process on one machine, on models of equal dimensions (an EBT and
its ``LlamaForCausalLM`` twin from ``llama_twin_config``), with random weights and random tokens:
cost does not depend on what the weights have learnt.

- training: one optimizer step (zero grads, loss, backward, clip 1.0, AdamW) of Transformer++,
  EBT S1 (2 inner steps) and EBT S2 (3 inner steps), the recipes of ``ebt.recipes``, each EBT also the plain way
  (``ebt.reference.plain_forward``: the doubled sequence recomputed at every inner step);
  tokens/s, peak memory and the ratio the FLOP count (``eval.flops``) predicts;
- generation: time per new token (batch 1, greedy) of ``LlamaForCausalLM.generate`` with its
  cache, cached EBT generation at several thinking steps (``--think-steps``, a list; every other
  ``ThinkingConfig`` setting has its ``--think-<field>`` flag), and uncached EBT generation, at
  several context lengths.

How it is measured, and why:
- the candidates being compared run round-robin inside every repeat, in a rotating order, so a
  change of machine load (a shared machine) hits all of them alike and the ratios stay fair;
  every figure is the median of the repeats, after warm-up rounds;
- AdamW runs at lr 0: it does all its arithmetic but the weights stay put, so every repeat
  times the same computation;
- time per generated token is the median, over all tokens of all repeats, of the time between
  two consecutive new tokens (``TokenClock``, a streamer): decoding only, the prompt's prefill
  (time to first token) is reported apart;
- peak memory is the peak of bytes allocated by tensors during one step above what was
  allocated before it, plus the weights and optimizer state (gradients are freed before the
  step, so they count in the step). On CUDA from ``torch.cuda.max_memory_allocated``; on CPU,
  where torch keeps no such counter (and ``tracemalloc`` cannot see its allocations), from the
  allocation and free events ``torch.profiler`` records with ``profile_memory=True``: their
  running sum is the bytes allocated at each moment. The CPU allocator caches nothing, so that
  is what the step really holds.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

from ebt import EBTConfig, EBTForCausalLM, llama_twin_config
from ebt.configuration_ebt import ThinkingConfig
from ebt.recipes import recipe
from ebt.reference import plain_forward

from .common import UsageError, add_thinking_arguments, comma_list, flatten_unique, markdown_table, thinking_settings
from .flops import Dims, Recipe, ebt_decode_flops, llama_decode_flops, train_step_flops

T = TypeVar("T")


@dataclass(frozen=True)
class Size:
    """Dimensions of one benchmarked EBT and its twin (SwiGLU hidden = width), and the workload."""

    layers: int
    width: int
    heads: int
    context: int  # training sequence length
    batch: int  # training sequences per step
    vocab: int
    gen_contexts: tuple[int, ...]  # prompt lengths for generation


SIZES = {
    # The smoke test's: seconds on any machine.
    "micro": Size(layers=2, width=32, heads=2, context=16, batch=2, vocab=17, gen_contexts=(8,)),
    # docs/design.md: character-level tiny Shakespeare on 2 CPU cores.
    "tiny": Size(layers=4, width=128, heads=4, context=64, batch=12, vocab=65, gen_contexts=(16, 64, 256)),
    # The paper's sizes (Table D.1), its context 256 and its GPT-NeoX tokenizer's vocabulary.
    "xxs": Size(layers=6, width=384, heads=6, context=256, batch=32, vocab=50277, gen_contexts=(64, 256, 1024)),
    "small": Size(layers=12, width=768, heads=12, context=256, batch=16, vocab=50277, gen_contexts=(64, 256, 1024)),
}
DEFAULT_SIZES = {"cpu": ("tiny",), "cuda": ("xxs", "small")}

# The two published recipes (docs/design.md, ``ebt.recipes``) as far as they change the cost of a
# step. S2 draws 2 or 3 steps per batch; the benchmark times its dearer case, 3, every step. Its
# replay buffer only changes where the candidates start, not what a step computes.
BENCH_RECIPES = {
    "S1": recipe("s1"),
    "S2": recipe("s2", train_steps=3, train_steps_max=None),
}
# Targets (what a ratio should be) live in docs/bench.md; this command only measures.


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], T]], warmup: int, repeats: int) -> dict[str, list[T]]:
    """What every function returns, one call per round, round-robin in a rotating order.

    Rotating and interleaving (see the module doc) keeps the comparison fair on a shared
    machine; the first ``warmup`` rounds are dropped.
    """
    names = list(fns)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            result = fns[name]()
            if r >= warmup:
                results[name].append(result)
    return results


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """``fn`` returning its wall-clock seconds instead (the device synchronised)."""

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    return run


class TokenClock:
    """A ``generate()`` streamer that notes when the prompt and each new token are put.

    ``transformers`` and EBT ``generate()`` put every token as soon as it is chosen (a CPU copy,
    so the device is synchronised), which times each decoding step on its own: no prefill in the
    per-token figure and one sample per token rather than one per call.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def intervals(self) -> list[float]:
        """Seconds to the first new token, then between consecutive new tokens."""
        return [b - a for a, b in itertools.pairwise(self.stamps)]


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by tensors while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each "[memory]" event is one allocation (+bytes) or free (-bytes); frees of tensors that
    # existed before profiling started are not reported, so the running sum starts at 0.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def top_ops(fn: Callable[[], object], device: torch.device, count: int = 12) -> list[dict]:
    """Where the time of one call goes: the ``count`` operators with the most self time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [e for e in prof.key_averages() if getattr(e, attribute) > 0]
    total = sum(getattr(e, attribute) for e in ops)
    ops.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return [
        {"op": e.key, "ms": getattr(e, attribute) / 1e3, "share": getattr(e, attribute) / total, "calls": e.count}
        for e in ops[:count]
    ]


class TrainStep:
    """One optimizer step of a model on a fixed batch: zero grads, loss, backward, clip, AdamW.

    lr 0: AdamW does all its arithmetic but the weights never move, so every repeat times the
    same computation.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()

    def resting_bytes(self) -> int:
        """Weights and optimizer state: what stays allocated between steps."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(
            t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        )
        return weights + state

    def peak_bytes(self, device: torch.device) -> int:
        self.optimizer.zero_grad(set_to_none=True)
        return self.resting_bytes() + peak_memory(self, device)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def ebt_config(size: Size, recipe: str, max_positions: int) -> EBTConfig:
    return EBTConfig(
        vocab_size=size.vocab,
        hidden_size=size.width,
        intermediate_size=size.width,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        max_position_embeddings=max_positions,
        **BENCH_RECIPES[recipe],
    )


def build_models(
    size: Size, max_positions: int, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, EBTForCausalLM], LlamaForCausalLM]:
    """An EBT per recipe and the Transformer++ twin, seeded, on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    ebts = {name: EBTForCausalLM(ebt_config(size, name, max_positions)).to(device, dtype) for name in BENCH_RECIPES}
    llama = LlamaForCausalLM(llama_twin_config(ebts["S1"].config)).to(device, dtype)
    return ebts, llama


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def bench_training(size: Size, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int, profile_ops: bool) -> dict:
    """Training steps of Transformer++ and of each EBT recipe, ours and the plain way."""
    ebts, llama = build_models(size, size.context, device, dtype)
    for model in (*ebts.values(), llama):
        model.train()
    ids = torch.randint(size.vocab, (size.batch, size.context), device=device)
    steps = {"Transformer++": TrainStep(llama, lambda m: m(input_ids=ids, labels=ids).loss)}
    for name, model in ebts.items():
        steps[f"EBT {name}"] = TrainStep(model, lambda m: m(input_ids=ids, labels=ids).loss)
        steps[f"EBT {name} plain"] = TrainStep(model, lambda m: plain_forward(m, ids, ids).loss)
    times = interleaved({name: timed(step, device) for name, step in steps.items()}, warmup, repeats)

    dims = Dims.of(ebts["S1"].config)
    tokens = size.batch * size.context
    rows = []
    for name, step in steps.items():
        recipe = name.split()[1] if name.startswith("EBT") else None
        flops = train_step_flops(dims, size.context, Recipe.of(ebts[recipe or "S1"].config))
        way = "llama" if recipe is None else ("plain" if name.endswith("plain") else "ebt")
        median = statistics.median(times[name])
        row = {
            "name": name,
            "recipe": recipe,
            "way": way,
            "inner_steps": ebts[recipe].config.train_steps if recipe else None,
            "seconds": times[name],
            "median_s": median,
            "tokens_per_s": tokens / median,
            "peak_bytes": step.peak_bytes(device),
            "flops_per_token": flops[way],
        }
        if profile_ops:
            row["top_ops"] = top_ops(step, device)
        rows.append(row)
    return {"tokens_per_step": tokens, "rows": rows}


def bench_generation(
    size: Size,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    thinking: list[ThinkingConfig],
    uncached_steps: list[int],
    new_tokens: int,
    profile_ops: bool,
    compiled: bool = False,
) -> dict:
    """Per-token decoding time of Transformer++ and EBT, batch 1: cached at every setting of
    ``thinking`` (they differ in their steps k), uncached at each of ``uncached_steps`` (the first
    setting's other fields), and with ``compiled`` also cached through ``compile_thinking()``
    (compiled during the warm-up rounds), cached and uncached."""
    ebts, llama = build_models(size, max(size.gen_contexts) + new_tokens + 1, device, dtype)
    ebt = ebts["S1"].eval()
    llama.eval()
    ebt_compiled = None
    if compiled:
        ebt_compiled = copy.deepcopy(ebt)
        ebt_compiled.compile_thinking()
    dims = Dims.of(ebt.config)
    contexts = []
    for length in size.gen_contexts:
        prompt = torch.randint(size.vocab, (1, length), device=device)
        mask = torch.ones_like(prompt)
        options = {"llama": {}} | {f"cached k={t.steps}": {"thinking": t} for t in thinking}
        options |= {f"uncached k={k}": {"thinking": replace(thinking[0], steps=k), "use_cache": False} for k in uncached_steps}
        if compiled:
            options |= {f"compiled cached k={t.steps}": {"thinking": t} for t in thinking}
            options |= {
                f"compiled uncached k={k}": {"thinking": replace(thinking[0], steps=k), "use_cache": False}
                for k in uncached_steps
            }

        def call(name: str, tokens: int, prompt=prompt, mask=mask, options=options) -> Callable[[], list[float]]:
            if name == "llama":
                model, kwargs = llama, {"attention_mask": mask, "do_sample": False, "use_cache": True, "pad_token_id": 0}
            else:
                model, kwargs = (ebt_compiled if name.startswith("compiled") else ebt), {}

            def run() -> list[float]:
                clock = TokenClock()
                model.generate(prompt, max_new_tokens=tokens, streamer=clock, **kwargs, **options[name])
                return clock.intervals()

            return run

        samples = interleaved({name: call(name, new_tokens) for name in options}, warmup, repeats)
        rows = []
        for name, calls in samples.items():
            think = options[name].get("thinking")
            think = think.resolve(ebt.config) if think is not None else None
            k = think.steps if think is not None else None
            cached = options[name].get("use_cache", True)
            flops = llama_decode_flops(dims, length) if k is None else ebt_decode_flops(dims, length, k, cached, think.samples)
            row = {
                "name": name,
                "think_steps": k,
                "think_samples": think.samples if think is not None else None,
                "cached": cached,
                "first_token_s": statistics.median(c[0] for c in calls),
                "per_token_s": statistics.median(t for c in calls for t in c[1:]),
                "token_seconds": calls,
                "flops_per_token": flops,
            }
            if profile_ops:  # 4 tokens: a full-length trace holds hundreds of thousands of events
                row["top_ops"] = top_ops(call(name, 4), device)
            rows.append(row)
        contexts.append({"context": length, "rows": rows})
    return {"new_tokens": new_tokens, "contexts": contexts}


# --------------------------------------------------------------------------------------------
# Targets and report
# --------------------------------------------------------------------------------------------


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name), None)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _x(n: float) -> str:
    return f"{n:.2f}x"


def training_tables(training: dict) -> str:
    rows = training["rows"]
    llama = _row(rows, "Transformer++")
    main = []
    for r in rows:
        if r["way"] == "plain":
            continue
        main.append(
            [
                r["name"],
                str(r["inner_steps"] or "-"),
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                _mib(r["peak_bytes"]),
                _x(r["median_s"] / llama["median_s"]),
                _x(r["flops_per_token"] / llama["flops_per_token"]),
                f"{(r['median_s'] / llama['median_s']) / (r['flops_per_token'] / llama['flops_per_token']) - 1:+.0%}",
                _x(r["peak_bytes"] / llama["peak_bytes"]),
            ]
        )
    reuse = []
    for r in rows:
        if r["way"] != "ebt":
            continue
        plain = _row(rows, r["name"] + " plain")
        reuse.append(
            [
                r["recipe"],
                str(r["inner_steps"]),
                f"{r['median_s'] * 1e3:.1f}",
                f"{plain['median_s'] * 1e3:.1f}",
                _x(plain["median_s"] / r["median_s"]),
                _x(plain["flops_per_token"] / r["flops_per_token"]),
                _mib(r["peak_bytes"]),
                _mib(plain["peak_bytes"]),
                _x(plain["flops_per_token"] / llama["flops_per_token"]),
            ]
        )
    return (
        f"Training step ({training['tokens_per_step']} tokens)\n\n"
        + markdown_table(
            [
                "model",
                "inner steps",
                "ms/step",
                "tokens/s",
                "peak MiB",
                "time vs T++",
                "FLOPs vs T++",
                "time over FLOP model",
                "memory vs T++",
            ],
            main,
        )
        + "\n\nContext reuse: the same EBT step, ours against the plain doubled sequence\n\n"
        + markdown_table(
            [
                "recipe",
                "inner steps",
                "ours ms",
                "plain ms",
                "speed-up",
                "FLOP-predicted",
                "ours MiB",
                "plain MiB",
                "plain FLOPs vs T++",
            ],
            reuse,
        )
    )


def generation_table(generation: dict) -> str:
    names = [r["name"] for r in generation["contexts"][0]["rows"]]
    rows = []
    for ctx in generation["contexts"]:
        llama = _row(ctx["rows"], "llama")["per_token_s"]
        cells = [str(ctx["context"])]
        for name in names:
            r = _row(ctx["rows"], name)
            ratio = "" if name == "llama" else f" ({_x(r['per_token_s'] / llama)})"
            cells.append(f"{r['per_token_s'] * 1e3:.2f}{ratio}")
        rows.append(cells)
    header = ["context"] + [("T++" if n == "llama" else "EBT " + n) + " ms/token" for n in names]
    speedups = []
    for ctx in generation["contexts"]:
        for r in ctx["rows"]:
            cached = _row(ctx["rows"], r["name"].replace("uncached k=", "cached k="))
            if not r["cached"] and cached is not None:
                kind = "compiled" if r["name"].startswith("compiled") else "eager"
                ratio = _x(r["per_token_s"] / cached["per_token_s"])
                speedups.append([str(ctx["context"]), kind, str(r["think_steps"]), ratio])
    return (
        f"Generation, batch 1, greedy, {generation['new_tokens']} new tokens: median ms between two new tokens "
        "(in brackets: times Transformer++)\n\n"
        + markdown_table(header, rows)
        + "\n\nKV cache: uncached / cached time per token\n\n"
        + markdown_table(["context", "thinking", "k", "uncached / cached"], speedups)
    )


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


SWEEP = ("steps",)  # cached generation is timed at every --think-steps; the other settings are fixed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="default: tiny on CPU; xxs and small on CUDA")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--batch", type=int, help="training sequences per step, for every size (default: the size's)")
    parser.add_argument(
        "--contexts", type=int, nargs="+", help="generation prompt lengths, for every size (default: the size's)"
    )
    parser.add_argument("--sections", nargs="+", choices=("training", "generation"), default=["training", "generation"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; medians are reported (default 7)")
    parser.add_argument(
        "--uncached-steps",
        type=comma_list(int, minimum=0),
        nargs="*",
        default=[[2]],
        help="uncached generation: thinking steps (default 2)",
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per timed generation, >= 2 (default 16)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also record each candidate's top operators (torch.profiler)")
    parser.add_argument(
        "--compile", action="store_true", help="also time cached generation after compile_thinking() (torch.compile)"
    )
    parser.add_argument("--output", default="bench.json", help="JSON results (default bench.json)")
    add_thinking_arguments(parser, sweep=SWEEP, defaults={"steps": [1, 2, 4, 8]})


def main(args: argparse.Namespace) -> int:
    if args.new_tokens < 2:
        raise UsageError("--new-tokens must be >= 2: the first token includes the prompt's prefill.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch here.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = args.sizes or list(DEFAULT_SIZES[device.type])
    report: dict = {
        "machine": machine_info(device),
        "load_average_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"} | {"dtype": str(dtype), "sizes": sizes},
        "sizes": {},
    }
    print(
        f"bench on {report['machine']['gpu'] if device.type == 'cuda' else report['machine']['cpu']}, "
        f"{dtype}, {torch.get_num_threads()} threads, load average {report['load_average_start'][0]:.2f}\n"
    )
    overrides = ({"batch": args.batch} if args.batch else {}) | (
        {"gen_contexts": tuple(args.contexts)} if args.contexts else {}
    )
    for name in sizes:
        size = replace(SIZES[name], **overrides)
        result: dict = {"dims": asdict(size)}
        print(f"## {name}: {size.layers} layers, width {size.width}, {size.heads} heads, vocab {size.vocab}\n")
        if "training" in args.sections:
            result["training"] = bench_training(size, device, dtype, args.warmup, args.repeats, args.profile)
            print(training_tables(result["training"]) + "\n")
        if "generation" in args.sections:
            result["generation"] = bench_generation(
                size,
                device,
                dtype,
                args.warmup,
                args.repeats,
                thinking_settings(args),
                flatten_unique(args.uncached_steps),
                args.new_tokens,
                args.profile,
                args.compile,
            )
            print(generation_table(result["generation"]) + "\n")
        report["sizes"][name] = result
    report["load_average_end"] = os.getloadavg()
    print(f"load average at the end {report['load_average_end'][0]:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")
    return 0
