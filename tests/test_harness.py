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
from conftest import loglik_tolerance, top_gap, train_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from ebt import ThinkingConfig
from ebt.tasks import make_task, task_text
from eval import __main__ as eval_cli
from eval.harness import TASKS_DIR
from eval.thinking import score_ebt
from eval.uncertainty import score_tokens

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra: pip install -e '.[eval]'")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from eval.lm_eval_ebt import EBTLM  # noqa: E402

CONTEXT = 48
DEFAULT_STEPS = 3  # stored in the checkpoint's config; training uses 2, so a client that gets 3 read the config
# A run of the project's trainer small enough for ~15 s on 2 CPU cores (S1 recipe, addition only).
TINY_RUN = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    f"model.max_position_embeddings={CONTEXT}",
    f"model.ebt={{inference_steps: {DEFAULT_STEPS}}}",
    f"data.block_size={CONTEXT}",
    "data.tasks=[addition]",
    "data.task_examples=800",
    "data.task_val_examples=10",
    "train.micro_batch_size=16",
    "train.max_steps=40",
    "train.warmup_steps=4",
    "train.lr=0.01",
    "train.mixed_precision=fp32",
    "eval.every=1000",
    "eval.max_blocks=2",
    "eval.think_steps=[1]",
    "checkpoint.every=1000",
]
SHORT_DOCS = 8  # the first paragraphs of the text file fit one model window; the others need several


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``OUTPUT/final`` of a tiny EBT trained with the project's trainer: a Hub-style folder."""
    return train_tiny_run(tmp_path_factory.mktemp("run"), *TINY_RUN)


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


def _scored_tokens(samples: list[dict]) -> dict[int, int]:
    """doc_id -> the most tokens one request of the doc scores (character tokenizer: its length, + EOS)."""
    return {
        s["doc_id"]: len(s["doc"]["text"]) + 1 if "text" in s["doc"] else max(map(len, s["doc"]["choices"])) for s in samples
    }


def _ebt_samples(lm: EBTLM, text_file: Path, tasks: list[str], limit: int) -> dict[str, list[dict]]:
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=_local_tasks(text_file), limit=limit, log_samples=True)
    return {task: results["samples"][task] for task in tasks}


def _logit_scale(model, texts: list[str], tokenizer, **settings) -> float:
    """The largest |logit| the model gives (these settings) over ``texts``, each after one EOS: the
    scale of ``loglik_tolerance``."""
    scale = 0.0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), CONTEXT):
                scale = max(scale, float(model(torch.tensor([ids[start : start + CONTEXT]]), **settings).logits.abs().max()))
    return scale


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
    hf_samples = {
        task: [json.loads(line) for f in out.glob(f"**/samples_{task}_*.jsonl") for line in f.read_text().splitlines()]
        for task in tasks
    }
    hf = {task: _logliks(samples) for task, samples in hf_samples.items()}
    assert [len(hf[t]) for t in tasks] == [limit, limit]

    lm = EBTLM(str(checkpoint), device="cpu", dtype="float32", batch_size=8, think_steps=DEFAULT_STEPS)
    same = {task: _logliks(samples) for task, samples in _ebt_samples(lm, text_file, tasks, limit).items()}
    lm.thinking = ThinkingConfig(steps=2)
    trained_count = {task: _logliks(samples) for task, samples in _ebt_samples(lm, text_file, tasks, limit).items()}
    # Both runs batch the same requests alike (batch size 8), so they differ at most by rounding
    # (threads, another process): the float32 bound of loglik_tolerance, per request. The checkpoint's
    # default is plain descent from one start (no tie-breaking choice), so the bound applies.
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    texts = text_file.read_text().split("\n\n") + [
        s["doc"]["prompt"] + c for s in hf_samples["ebt_addition_mc"] for c in s["doc"]["choices"]
    ]
    scale = _logit_scale(model, texts, tokenizer)
    for task in tasks:
        tokens = _scored_tokens(hf_samples[task])
        for doc_id, values in hf[task].items():
            assert same[task][doc_id] == pytest.approx(values, abs=loglik_tolerance(tokens[doc_id], scale)), (task, doc_id)
    # hf got the checkpoint's stored setting (3 steps), not the trained count (2): thinking ran, as configured.
    tokens = _scored_tokens(hf_samples["ebt_text_ppl"])
    changed = sum(trained_count["ebt_text_ppl"][d][0] != pytest.approx(v[0], abs=loglik_tolerance(tokens[d], scale))
                  for d, v in hf["ebt_text_ppl"].items())  # fmt: skip
    assert changed == limit


# ------------------------------------------------------------------ 2. ebt == the project's perplexity evaluation


def test_ebt_loglikelihoods_equal_the_projects_perplexity_evaluation(checkpoint):
    # Settings whose result is a continuous function of the logits: self-verification that keeps the
    # lowest-energy start can pick the other start where two starts end within rounding of each
    # other, and lm-eval batches (and so rounds) otherwise than the project's evaluation; averaging
    # the starts' distributions cannot jump. The seeded starts and Langevin noise still apply.
    thinking = ThinkingConfig(steps=2, samples=2, selection="average", noise=0.5, seed=5)
    lm = EBTLM(str(checkpoint), device="cpu", dtype="float32", batch_size=4, thinking=thinking)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    # Rolling log-likelihood of documents that fit one window = eval.thinking on [EOS] + document.
    ds = make_task("addition", "test", 40, seed=2)
    text = "".join(task_text(p, a) for p, a in zip(ds["prompt"], ds["answer"]))
    docs = [text[i : i + 40] for i in range(0, 40 * 6, 40)]
    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)], disable_tqdm=True
    )
    windows = torch.tensor([[tokenizer.eos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs])
    per_doc = -score_tokens(model, windows, thinking).nll.sum(1)
    with torch.no_grad():
        scale = float(model(windows, thinking=thinking).logits.abs().max())
    # lm-eval runs the 6 windows in batches of 4, the project's evaluation in one batch of 6 (and
    # below in batches of 3): other shapes, other rounding; each document sums 40 log-likelihoods.
    tolerance = loglik_tolerance(len(docs[0]), scale)
    assert rolling == pytest.approx(per_doc.tolist(), abs=tolerance)
    thinking_eval = score_ebt(model, windows, 3, thinking)
    assert thinking_eval["tokens"] == sum(len(d) for d in docs)
    # perplexity = exp(mean NLL): compare the means, each off by at most the per-token bound
    assert -sum(rolling) / thinking_eval["tokens"] == pytest.approx(
        math.log(thinking_eval["perplexity"]), abs=tolerance / len(docs[0])
    )
    # the bound is tight enough to see a setting change: a different seed moves some document by more
    reseeded = -score_tokens(model, windows, thinking.merged(seed=6)).nll.sum(1)
    assert (reseeded - per_doc).abs().max() > tolerance

    # Log-likelihood of an answer after its prompt = the same per-token scores on prompt + answer.
    pairs = list(zip(ds["prompt"][:6], ds["answer"][:6]))
    scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    for (prompt, answer), (loglik, _) in zip(pairs, scored):
        ids = torch.tensor([tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]])
        nll = score_tokens(model, ids, thinking).nll[0, len(prompt) - 1 :]
        assert loglik == pytest.approx(-nll.sum().item(), abs=loglik_tolerance(len(answer), scale))


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

    # The bits per byte of each column is the project's perplexity evaluation at that many steps
    # (one start, the checkpoint's default: no tie-breaking choice, so the float32 bound applies).
    paragraphs = text_file.read_text().split("\n\n")[:SHORT_DOCS]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    n_bytes = sum(len(p.encode()) for p in paragraphs)
    for steps in (1, 3):
        ids = [
            torch.tensor([[tokenizer.eos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in paragraphs
        ]
        nll = sum(score_tokens(model, x, steps=steps).nll.sum().item() for x in ids)
        tolerance = sum(loglik_tolerance(len(p), _logit_scale(model, [p], tokenizer, think_steps=steps)) for p in paragraphs)
        got = report["results"][f"steps={steps}"]["results"]["ebt_text_ppl"]["bits_per_byte,none"]
        assert got == pytest.approx(nll / n_bytes / math.log(2), abs=tolerance / n_bytes / math.log(2)), steps
        assert f"{got:.4g}" in next(r for r in rows if r.startswith("| ebt_text_ppl | bits_per_byte"))


# ------------------------------------------------------------------ generation through both models


def test_generate_until_through_hf_and_ebt_equals_greedy_generate(checkpoint, text_file):
    manager = _local_tasks(text_file)
    common = dict(tasks=["ebt_addition"], task_manager=manager, device="cpu", batch_size=4, limit=8, log_samples=True)
    hf = simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},trust_remote_code=True,dtype=float32", **common)
    ebt_model = simple_evaluate(model="ebt", model_args=f"pretrained={checkpoint},think_steps={DEFAULT_STEPS}", **common)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for a, b in zip(hf["samples"]["ebt_addition"], ebt_model["samples"]["ebt_addition"]):
        assert a["filtered_resps"] == b["filtered_resps"]  # the same requests, batched alike
        ids = tokenizer(a["doc"]["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=8, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1] :]
        # lm-eval generates in left-padded batches of 4, this prompt alone: rounding differs, so the
        # tokens must agree as long as each argmax is decided by more than rounding (the float32
        # bound); after a near-tie (if the trained checkpoint has one) the two may part.
        ties = [t for t, logits in enumerate(out.logits) if top_gap(logits[0]) <= loglik_tolerance(1, logits.abs().max())]
        decided = tokenizer.decode(new[: ties[0] if ties else len(new)], skip_special_tokens=True)
        if "\n" in decided or not ties:
            assert a["filtered_resps"] == [decided.split("\n")[0]]
        else:
            assert a["filtered_resps"][0].startswith(decided)


def test_a_joint_mode_checkpoint_refuses_log_likelihood_requests(checkpoint, tmp_path):
    """A joint-mode EBT returns one logit row per answer-block position, not per next token: the
    ``ebt`` model must refuse log-likelihoods instead of scoring misaligned logits."""
    from ebt import EBTForCausalLM

    config = AutoModelForCausalLM.from_pretrained(checkpoint).config
    config.joint_block_size = 4
    EBTForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp_path)
    lm = EBTLM(pretrained=str(tmp_path), batch_size=1)
    with pytest.raises(ValueError, match="joint-mode EBT"):
        lm._model_call(torch.zeros(1, 8, dtype=torch.long))
