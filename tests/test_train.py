"""The training loop in-process: config schema, optimiser groups, schedule, export, failure policy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import ebt  # noqa: F401  (registers the EBT with the Auto classes)
from train import loop
from train.checkpoint import CheckpointError, checkpoints
from train.config import ConfigError, RunConfig, load_config
from train.replay import ReplayBuffer

REPO = Path(__file__).resolve().parents[1]
# A model and data small enough for a few seconds per run on 2 CPU cores.
TINY = [
    "model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.max_position_embeddings=32", "data.block_size=32", "data.task_examples=150", "data.task_val_examples=10",
    "train.micro_batch_size=4", "train.max_steps=6", "train.warmup_steps=2", "train.mixed_precision=fp32",
    "eval.every=3", "eval.max_blocks=8", "eval.think_steps=[1,3]", "checkpoint.every=3", "train.log_every=1",
]


def tiny(out, *extra):
    return load_config(None, [f"output_dir={out}", *TINY, *extra])


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- config
def test_shipped_tiny_config_is_the_default():
    assert load_config(REPO / "configs" / "tiny.yaml") == RunConfig()


@pytest.mark.parametrize("name", ["shakespeare_char_ebt_s1", "shakespeare_char_ebt_s2", "shakespeare_char_llama", "xxs_fineweb"])
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.data.block_size <= cfg.model.max_position_embeddings


def test_overrides_are_typed_and_unknown_keys_listed():
    cfg = load_config(None, ["train.max_steps=7", "train.lr=1e-4", "eval.think_steps=[1,8]", "data.val_split=null"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.eval.think_steps, cfg.data.val_split) == (7, 1e-4, [1, 8], None)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.max_step;.*train.max_steps"):
        load_config(None, ["train.max_step=7"])
    with pytest.raises(ConfigError, match="train.max_steps must be of type int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="exceeds model.max_position_embeddings"):
        load_config(None, ["data.block_size=128"])


def test_cli_rejects_bad_config_with_exit_code_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train", f"output_dir={tmp_path / 'r'}", "model.widht=3"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "model.hidden_size" in r.stderr and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- optimiser and schedule
def test_alpha_has_its_own_group_and_each_group_its_own_floor():
    cfg = load_config(None, TINY)
    from ebt.tokenizer import char_tokenizer

    model = loop.build_model(cfg.model, char_tokenizer(["0123456789+="]))
    opt = loop.build_optimizer(model, cfg.train)
    alpha = [g for g in opt.param_groups if any(p is model.alpha for p in g["params"])]
    assert len(alpha) == 1 and len(alpha[0]["params"]) == 1
    assert alpha[0]["lr"] == pytest.approx(cfg.train.lr * model.config.step_size_lr_multiplier)
    assert alpha[0]["weight_decay"] == 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: loop.lr_factor(s, cfg.train))
    for _ in range(cfg.train.max_steps):
        opt.step()
        sched.step()
    base = cfg.train.lr * cfg.train.min_lr_ratio
    assert sched.get_last_lr()[0] == pytest.approx(base)
    assert alpha[0]["lr"] == pytest.approx(base * model.config.step_size_lr_multiplier)  # not the base floor


def test_replay_buffer_ring_and_round_trip(tmp_path):
    buf = ReplayBuffer(3)
    for i in range(4):
        buf.add(torch.full((2, 5), i), torch.full((2, 5), i), torch.full((2, 5, 7), float(i)))
    assert len(buf) == 3 and sorted(buf.input_ids[:, 0].tolist()) == [2, 3, 3]  # oldest rows overwritten
    buf.save(tmp_path / "r.safetensors")
    again = ReplayBuffer(3)
    again.load(tmp_path / "r.safetensors", torch.device("cpu"))
    assert torch.equal(again.logits, buf.logits) and again.next == buf.next
    assert buf.sample(4) is None and buf.sample(2)[2].shape == (2, 5, 7)


# ---------------------------------------------------------------- whole runs
@pytest.mark.parametrize("kind", ["ebt", "llama"])
def test_run_checkpoints_and_exports_a_loadable_model(tmp_path, kind):
    out = tmp_path / kind
    final = loop.Trainer(tiny(out, f"model.kind={kind}", "checkpoint.keep_last=1")).run()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert ("val/loss_think3" in final) == (kind == "ebt")
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["checkpoint-00000006"]  # keep_last=1
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.model_type == kind and model.config.vocab_size == len(tok)
    card = (out / "final" / "README.md").read_text()
    assert "tokens seen" in card and f"{final['val/loss']:.4f}" in card
    ids = tok("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_output_folder_of_another_run_is_refused(tmp_path):
    out = tmp_path / "r"
    loop.Trainer(tiny(out, "train.max_steps=1", "model.kind=llama")).run()
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(CheckpointError, match="holds another run.*train.lr"):
        loop.Trainer(tiny(out, "train.max_steps=1", "model.kind=llama", "train.lr=0.5"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a run folder"):
        loop.Trainer(tiny(other))
    assert sorted(p.name for p in out.rglob("*")) == before and (other / "notes.txt").read_text() == "mine"


def test_corrupt_or_missing_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    loop.Trainer(tiny(out, "model.kind=llama", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=3")).run()
    latest = checkpoints(out / "checkpoints")[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        loop.Trainer(tiny(out, "model.kind=llama", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=3")).run()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        loop.Trainer(tiny(out, "model.kind=llama", "train.max_steps=3", "checkpoint.every=1", "checkpoint.resume=/nope"))
    older = checkpoints(out / "checkpoints")[-2]
    (older / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match="lacks random_states_0.pkl"):
        loop.Trainer(tiny(out, "model.kind=llama", "train.max_steps=3", "checkpoint.every=1", f"checkpoint.resume={older}")).run()


def test_non_finite_steps_are_skipped_then_stop_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = loop.build_model

    def poisoned(*args):
        model = real(*args)
        calls = {"n": 0}

        def hook(module, inputs, output):  # from the 4th training forward on, the loss is NaN
            calls["n"] += module.training
            if module.training and calls["n"] >= 4:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    trainer = loop.Trainer(tiny(out, "model.kind=llama", "train.max_nonfinite_steps=2", "checkpoint.every=3"))
    with pytest.raises(loop.NonFiniteLoss, match="2 consecutive non-finite steps"):
        trainer.run()
    rows = metrics(out)
    assert [r.get("skipped", 0) for r in rows] == [0, 0, 0, 1]  # step 5 raised before logging
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["checkpoint-00000003"]
    assert not (out / "final").exists()
    saved = load_file(out / "checkpoints" / "checkpoint-00000003" / "model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


# ---------------------------------------------------------------- streamed sources
def _jsonl(path, n=60):
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "the quick brown fox " * (i % 5 + 1)}) + "\n" for i in range(n)))
    return path


def test_stream_position_round_trips(tmp_path):
    from ebt import data as D
    from ebt.tokenizer import char_tokenizer
    from train.inputs import StreamBatches

    src = D.load_source(str(_jsonl(tmp_path / "c.jsonl")), streaming=True)
    tok = char_tokenizer(D.iter_texts(D.load_source(str(tmp_path / "c.jsonl")), ["text"]))
    packed = D.pack(D.tokenize(src, tok), 16)
    a = StreamBatches(packed, rank=0, world=1, seed=0, shuffle_buffer=0)
    for step in range(3):
        a.micro(step, 0, 4)
    state = json.loads(json.dumps(a.state_dict()))  # saved as JSON in checkpoints
    expected = a.micro(3, 0, 4)
    b = StreamBatches(packed, rank=0, world=1, seed=0, shuffle_buffer=0)
    b.load_state_dict(state)
    assert torch.equal(b.micro(3, 0, 4)["input_ids"], expected["input_ids"])


def test_streamed_local_corpus_trains(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "r"
    loop.Trainer(tiny(out, "model.kind=llama", f"data.source={src}", "data.streaming=true", "data.val_blocks=4",
                      "data.shuffle_buffer=16", "train.max_steps=3")).run()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and (out / "final" / "tokenizer.json").is_file()


def test_bad_data_fails_fast_and_leaves_no_half_made_run(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short for a block")
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="no complete block"):
        loop.Trainer(tiny(out, f"data.source={short}"))
    assert not out.exists()  # so the corrected command may use it
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 " * 50)
    r = subprocess.run([sys.executable, "-m", "train", f"output_dir={out}", f"data.source={tmp_path / 'bad.txt'}"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "not UTF-8" in r.stderr and not out.exists()


def test_fsdp_is_refused_with_the_reason(tmp_path, monkeypatch):
    from accelerate import Accelerator, DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match="pytorch#172543.*multi_gpu.yaml"):
        loop.make_accelerator(tiny(tmp_path / "r"))
