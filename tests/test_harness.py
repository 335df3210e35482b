"""lm-evaluation-harness on an exported checkpoint (issue 7): the stock ``hf`` model and the ``ebt``
model agree at equal thinking settings, the ``ebt`` model's log-likelihoods are the project's own
perplexity evaluation, and ``python -m eval harness`` sweeps thinking steps into one table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ebt.tasks import make_task, task_text
from ebt.uncertainty import score_tokens
from eval import __main__ as eval_cli
from eval.harness import TASKS_DIR
from eval.thinking import score_ebt

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra: pip install -e '.[eval]'")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from eval.lm_eval_ebt import EBTLM  # noqa: E402

CONTEXT = 48
DEFAULT_STEPS = 3  # stored in the checkpoint's config; training uses 2, so a client that gets 3 read the config
# A run of the project's trainer small enough for ~15 s on 2 CPU cores (S1 recipe, addition only).
TINY_RUN = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    f"model.max_position_embeddings={CONTEXT}", f"model.ebt={{inference_steps: {DEFAULT_STEPS}}}",
    f"data.block_size={CONTEXT}", "data.tasks=[addition]", "data.task_examples=800", "data.task_val_examples=10",
    "train.micro_batch_size=16", "train.max_steps=40", "train.warmup_steps=4", "train.lr=0.01", "train.mixed_precision=fp32",
    "eval.every=1000", "eval.max_blocks=2", "eval.think_steps=[1]", "checkpoint.every=1000",
]
SHORT_DOCS = 8  # the first paragraphs of the text file fit one model window; the others need several


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``OUTPUT/final`` of a tiny EBT trained with the project's trainer: a Hub-style folder."""
    from train.config import load_config
    from train.loop import Trainer

    out = tmp_path_factory.mktemp("run")
    Trainer(load_config(None, [f"output_dir={out}", *TINY_RUN])).run()
    return out / "final"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Paragraphs of addition problems: 8 short ones (< 40 characters), then 8 longer than a window."""
    ds = make_task("addition", "validation", 80, seed=1)
    lines = [task_text(p, a).strip() for p, a in zip(ds["prompt"], ds["answer"])]
    sizes = [2] * SHORT_DOCS + [7] * 8
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    paragraphs = ["\n".join(lines[s : s + n]) for s, n in zip(starts, sizes)]
    assert all(len(p) < 40 for p in paragraphs[:SHORT_DOCS]) and all(len(p) > CONTEXT for p in paragraphs[SHORT_DOCS:])
    path = tmp_path_factory.mktemp("text") / "addition.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def _local_tasks(text_file: Path) -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"text_file": str(text_file)})


def _logliks(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of every request of the doc (every choice, or the rolling total)."""
    out = {}
    for s in samples:
        resps = s["filtered_resps"]
        out[s["doc_id"]] = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    return out


def _ebt_samples(lm: EBTLM, text_file: Path, tasks: list[str], limit: int) -> dict[str, dict]:
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=_local_tasks(text_file), limit=limit, log_samples=True)
    return {task: _logliks(results["samples"][task]) for task in tasks}


# ------------------------------------------------------------------ 1. hf == ebt at equal settings


@pytest.mark.slow
def test_lm_eval_hf_command_and_ebt_model_agree_at_equal_thinking_settings(checkpoint, text_file, tmp_path):
    tasks, limit = ["ebt_addition_mc", "ebt_text_ppl"], 16
    out = tmp_path / "hf"
    command = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={checkpoint}", "trust_remote_code=True", "dtype=float32",
        "--tasks", *tasks, "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "8",
        "--limit", str(limit), "--metadata", json.dumps({"text_file": str(text_file)}),
        "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    hf = {task: _logliks([json.loads(line) for f in out.glob(f"**/samples_{task}_*.jsonl") for line in f.read_text().splitlines()])
          for task in tasks}  # fmt: skip
    assert [len(hf[t]) for t in tasks] == [limit, limit]

    lm = EBTLM(str(checkpoint), device="cpu", dtype="float32", batch_size=8, think_steps=DEFAULT_STEPS)
    same = _ebt_samples(lm, text_file, tasks, limit)
    lm.set_thinking(think_steps=2)
    trained_count = _ebt_samples(lm, text_file, tasks, limit)
    for task in tasks:
        for doc_id, values in hf[task].items():
            assert same[task][doc_id] == pytest.approx(values, rel=1e-5, abs=1e-4), (task, doc_id)
    # hf got the checkpoint's stored setting (3 steps), not the trained count (2): thinking ran, as configured.
    changed = sum(trained_count["ebt_text_ppl"][d] != pytest.approx(v, rel=1e-4) for d, v in hf["ebt_text_ppl"].items())
    assert changed == limit


# ------------------------------------------------------------------ 2. ebt == the project's perplexity evaluation


def test_ebt_loglikelihoods_equal_the_projects_perplexity_evaluation(checkpoint):
    think = {"steps": 2, "samples": 2, "seed": 5}
    lm = EBTLM(str(checkpoint), device="cpu", dtype="float32", batch_size=4, **{f"think_{k}": v for k, v in think.items()})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    # Rolling log-likelihood of documents that fit one window = eval.thinking on [EOS] + document.
    ds = make_task("addition", "test", 40, seed=2)
    text = "".join(task_text(p, a) for p, a in zip(ds["prompt"], ds["answer"]))
    docs = [text[i : i + 40] for i in range(0, 40 * 6, 40)]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)], disable_tqdm=True)
    windows = torch.tensor([[tokenizer.eos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs])
    per_doc = -score_tokens(model, windows, **think).nll.sum(1)
    assert rolling == pytest.approx(per_doc.tolist(), rel=1e-5)
    thinking = score_ebt(model, windows, batch_size=3, think=think)
    assert thinking["tokens"] == sum(len(d) for d in docs)
    assert math.exp(-sum(rolling) / thinking["tokens"]) == pytest.approx(thinking["perplexity"], rel=1e-5)

    # Log-likelihood of an answer after its prompt = the same per-token scores on prompt + answer.
    pairs = list(zip(ds["prompt"][:6], ds["answer"][:6]))
    scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    for (prompt, answer), (loglik, _) in zip(pairs, scored):
        ids = torch.tensor([tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]])
        nll = score_tokens(model, ids, **think).nll[0, len(prompt) - 1 :]
        assert loglik == pytest.approx(-nll.sum().item(), rel=1e-5)


# ------------------------------------------------------------------ 3. one command, one table


def test_harness_command_sweeps_thinking_steps_into_one_table(checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = [
        "harness", "--model", str(checkpoint), "--tasks", "ebt_addition_mc,ebt_text_ppl", "--text-file", str(text_file),
        "--think-steps", "1,3", "--limit", str(SHORT_DOCS), "--batch-size", "8", "--output", str(out),
    ]  # fmt: skip
    assert eval_cli.main(argv) == 0
    report = json.loads(out.read_text())
    table = report["table"]
    assert table in capsys.readouterr().out
    header, rule, *rows = table.splitlines()
    assert header == "| task | metric | steps=1 | steps=3 |" and len(rule.split("|")) == 6
    assert any(r.startswith("| ebt_addition_mc | acc ↑ |") for r in rows)

    # The bits per byte of each column is the project's perplexity evaluation at that many steps.
    paragraphs = text_file.read_text().split("\n\n")[:SHORT_DOCS]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for steps in (1, 3):
        nll = sum(
            score_tokens(model, torch.tensor([[tokenizer.eos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]]), steps=steps).nll.sum().item()
            for p in paragraphs
        )
        expected = nll / sum(len(p.encode()) for p in paragraphs) / math.log(2)
        got = report["results"][f"steps={steps}"]["results"]["ebt_text_ppl"]["bits_per_byte,none"]
        assert got == pytest.approx(expected, rel=1e-5), steps
        assert f"{got:.4g}" in next(r for r in rows if r.startswith("| ebt_text_ppl | bits_per_byte"))


def test_harness_rejects_bad_step_lists(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["harness", "--model", "x", "--tasks", "ebt_addition_mc", "--think-steps", "1,0"])
    assert "every value must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ generation through both models


def test_generate_until_through_hf_and_ebt_equals_greedy_generate(checkpoint, text_file):
    manager = _local_tasks(text_file)
    common = dict(tasks=["ebt_addition"], task_manager=manager, device="cpu", batch_size=4, limit=8, log_samples=True)
    hf = simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},trust_remote_code=True,dtype=float32", **common)
    ebt_model = simple_evaluate(model="ebt", model_args=f"pretrained={checkpoint},think_steps={DEFAULT_STEPS}", **common)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for a, b in zip(hf["samples"]["ebt_addition"], ebt_model["samples"]["ebt_addition"]):
        ids = tokenizer(a["doc"]["prompt"], return_tensors="pt")["input_ids"]
        greedy = tokenizer.decode(model.generate(ids, max_new_tokens=8)[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert a["filtered_resps"] == b["filtered_resps"] == [greedy]
