"""The training loop in-process: config schema, optimiser groups, schedule, export, failure policy."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import ebt  # noqa: F401  (registers the EBT with the Auto classes)
from ebt import EBTConfig
from ebt.recipes import RECIPES
from train import loop
from train.checkpoint import CheckpointError, checkpoints, write_manifest
from train.config import ConfigError, RunConfig, ebt_config, load_config
from train.replay import ReplayBuffer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- config
def test_shipped_tiny_config_is_the_default():
    assert load_config(REPO / "configs" / "tiny.yaml") == RunConfig()


@pytest.mark.parametrize(
    "name",
    ["shakespeare_char_ebt", "shakespeare_char_ebt_s1", "shakespeare_char_ebt_s2", "shakespeare_char_llama", "xxs_fineweb"],
)
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.data.block_size <= cfg.model.max_position_embeddings


def test_default_text_recipe_and_its_twin_differ_only_in_the_model():
    """configs/shakespeare_char_ebt.yaml and configs/shakespeare_char_llama.yaml see the same data,
    sizes, schedule and tokens: only the model kind, the recipe, the run folder and the EBT's
    validation step counts differ."""

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    energy = flat(dataclasses.asdict(load_config(REPO / "configs" / "shakespeare_char_ebt.yaml")))
    twin = flat(dataclasses.asdict(load_config(REPO / "configs" / "shakespeare_char_llama.yaml")))
    differing = {k for k in energy if energy[k] != twin[k]}
    assert differing == {"output_dir", "model.kind", "model.recipe", "eval.think_steps"}
    assert (energy["model.kind"], energy["model.recipe"]) == ("ebt", "draft")


def test_overrides_are_typed_and_unknown_keys_listed():
    cfg = load_config(None, ["train.max_steps=7", "train.lr=1e-4", "eval.think_steps=[1,8]", "data.val_split=null"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.eval.think_steps, cfg.data.val_split) == (7, 1e-4, [1, 8], None)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.max_step;.*train.max_steps"):
        load_config(None, ["train.max_step=7"])
    with pytest.raises(ConfigError, match="train.max_steps must be of type int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="exceeds model.max_position_embeddings"):
        load_config(None, ["model.max_position_embeddings=64", "data.block_size=128"])


def test_model_defaults_are_ebtconfigs_own():
    """One source of model defaults: a run config that sets nothing builds EBTConfig's defaults."""
    cfg = load_config(None)
    built, plain = ebt_config(cfg.model, vocab_size=64), EBTConfig(vocab_size=64)
    assert built.to_dict() == plain.to_dict()


def test_recipe_presets_with_overrides_on_top():
    cfg = load_config(None, ["model.recipe=s2", "model.ebt.step_size=4.0", "model.ebt.inference_steps=5"])
    built = ebt_config(cfg.model, vocab_size=64)
    expected = {**RECIPES["s2"], "step_size": 4.0, "inference_steps": 5}
    assert {k: getattr(built, k) for k in expected} == expected
    s1 = ebt_config(load_config(None, ["model.recipe=s1"]).model, vocab_size=64)
    assert {k: getattr(s1, k) for k in RECIPES["s1"]} == RECIPES["s1"]


def test_bad_model_settings_fail_at_load_with_ebtconfigs_message(tmp_path):
    with pytest.raises(ConfigError, match=r"^EBTConfig.step_size=-1.0 is invalid: must be a finite number > 0.$"):
        load_config(None, ["model.ebt.step_size=-1.0"])
    with pytest.raises(
        ConfigError, match=r"^EBTConfig.hidden_size=30 is invalid: must be divisible by num_attention_heads=4.$"
    ):
        load_config(None, ["model.hidden_size=30"])
    with pytest.raises(
        ConfigError, match=r"model.ebt has unknown key\(s\) \['hidden_size', 'step_sise'\] \(model.hidden_size"
    ):
        load_config(None, ["model.ebt.step_sise=3", "model.ebt.hidden_size=64"])
    known = ", ".join(sorted(RECIPES))
    with pytest.raises(ConfigError, match=f"model.recipe: unknown EBT recipe 's3'; known recipes: {known}"):
        load_config(None, ["model.recipe=s3"])
    with pytest.raises(ConfigError, match="model.kind='gpt' is not one of ebt, llama"):
        load_config(None, ["model.kind=gpt"])
    # before any tokenizer or data work: a data source that does not exist is never looked at
    r = subprocess.run(
        [sys.executable, "-m", "train", f"output_dir={tmp_path / 'r'}", "data.source=/nope.txt", "model.ebt.loss_on=first"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "EBTConfig.loss_on='first' is invalid" in r.stderr and "nope" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_replay_needs_a_model_that_replays():
    with pytest.raises(ConfigError, match="train.replay_buffer_size=4 needs a model .*LlamaForCausalLM has none"):
        load_config(None, ["model.kind=llama", "train.replay_buffer_size=4"])
    assert load_config(None, ["model.kind=ebt", "train.replay_buffer_size=4"]).train.replay_buffer_size == 4


def test_cli_rejects_bad_config_with_exit_code_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "train", f"output_dir={tmp_path / 'r'}", "model.widht=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "model.hidden_size" in r.stderr and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- optimiser and schedule
class _Overridden(torch.nn.Module):
    """A model with one overridden parameter, as a model's optimizer_overrides hook declares it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)  # weight decays, bias doesn't
        self.norm = torch.nn.Parameter(torch.ones(3))
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.frozen = torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def optimizer_overrides(self):
        return {"scale": {"lr_scale": 10.0, "weight_decay": 0.0}}


def test_optimizer_groups_are_generic_with_the_models_overrides(tiny_run):
    cfg = tiny_run("unused").train
    model = _Overridden()
    groups = loop.build_optimizer(model, cfg).param_groups
    got = [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups]
    assert got == [
        ([id(model.proj.weight)], cfg.lr, cfg.weight_decay),
        ([id(model.norm), id(model.proj.bias)], cfg.lr, 0.0),  # named_parameters order
        ([id(model.scale)], pytest.approx(cfg.lr * 10.0), 0.0),
    ]
    model.optimizer_overrides = lambda: {"nope": {"lr_scale": 2.0}}
    with pytest.raises(ValueError, match=r"optimizer_overrides names no parameter \['nope'\]"):
        loop.build_optimizer(model, cfg)


def test_alpha_has_its_own_group_and_each_group_its_own_floor(tiny_run):
    cfg = tiny_run("unused")
    from train.tokenizer import char_tokenizer

    model = loop.build_model(cfg.model, char_tokenizer(["0123456789+="]))
    opt = loop.build_optimizer(model, cfg.train)
    assert len(opt.param_groups) == 3  # decay, no decay, alpha
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
        buf.add(
            {
                "input_ids": torch.full((2, 5), i),
                "labels": torch.full((2, 5), i),
                "init_logits": torch.full((2, 5, 7), float(i)),
            }
        )
    assert len(buf) == 3 and sorted(buf.rows["input_ids"][:, 0].tolist()) == [2, 3, 3]  # oldest rows overwritten
    buf.save(tmp_path / "r.safetensors")
    again = ReplayBuffer(3)
    again.load(tmp_path / "r.safetensors", torch.device("cpu"))
    assert again.rows.keys() == buf.rows.keys() and again.next == buf.next
    assert all(torch.equal(again.rows[k], buf.rows[k]) for k in buf.rows)
    assert buf.sample(4) is None
    torch.manual_seed(0)
    sample = buf.sample(2)
    assert sample["init_logits"].shape == (2, 5, 7)
    assert torch.equal(sample["init_logits"][:, 0, 0].long(), sample["input_ids"][:, 0])  # rows stay together
    with pytest.raises(ValueError, match="the buffer holds"):
        buf.add({"input_ids": torch.zeros(1, 5)})
    with pytest.raises(ValueError, match="one row count"):
        ReplayBuffer(3).add({"a": torch.zeros(1, 5), "b": torch.zeros(2, 5)})


# ---------------------------------------------------------------- whole runs
@pytest.mark.parametrize("kind", ["ebt", "llama"])
def test_run_checkpoints_and_exports_a_loadable_model(tmp_path, kind, tiny_run, run_metrics):
    out = tmp_path / kind
    final = loop.Trainer(tiny_run(out, f"model.kind={kind}", "checkpoint.keep_last=1")).run()
    rows = run_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert ("val/loss_think3" in final) == (kind == "ebt")
    if kind == "ebt":  # S1: the objective is the mean over the inner steps, the logged loss the final step's
        for r in rows:
            steps = [r[k] for k in sorted((k for k in r if k.startswith("step_loss_")), key=lambda k: int(k.split("_")[-1]))]
            assert len(steps) == 2 and r["loss"] == pytest.approx(steps[-1], rel=1e-6)  # what val/loss measures
            assert r["objective"] == pytest.approx(sum(steps) / len(steps), rel=1e-6)
        assert {"alpha", "energy_drop"} <= rows[0].keys()
    else:  # a plain causal LM: its loss is its objective, and it has no inner loop to report
        assert not any({"objective", "alpha", "step_loss_1"} & r.keys() for r in rows)
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["checkpoint-00000006"]  # keep_last=1
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.model_type == kind and model.config.vocab_size == len(tok)
    card = (out / "final" / "README.md").read_text()
    assert "tokens seen" in card and f"{final['val/loss']:.4f}" in card
    ids = tok("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_rerunning_a_finished_run_says_so_and_touches_nothing(tmp_path, tiny_run, run_metrics, train_overrides, capsys):
    from train.__main__ import main

    out = tmp_path / "r"
    args = [
        f"output_dir={out}",
        *train_overrides,
        "model.kind=llama",
        "train.max_steps=2",
        "eval.every=2",
        "checkpoint.every=1",
    ]
    assert main(args) == 0
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    folders = sorted(p for p in out.rglob("*") if p.is_dir())
    capsys.readouterr()
    assert main(args) == 0
    assert f"{out} is finished (2 steps)" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files
    assert sorted(p for p in out.rglob("*") if p.is_dir()) == folders
    # killed after its last checkpoint but before the export: the re-run exports without training
    shutil.rmtree(out / "final")
    assert main(args) == 0 and (out / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in run_metrics(out)] == [1, 2]


def test_output_folder_of_another_run_is_refused(tmp_path, tiny_run):
    out = tmp_path / "r"
    loop.Trainer(tiny_run(out, "train.max_steps=1", "model.kind=llama")).run()
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(CheckpointError, match="holds another run.*train.seed"):  # a shape or data-order setting
        loop.Trainer(tiny_run(out, "train.max_steps=1", "model.kind=llama", "train.seed=7", "train.lr=0.5"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a run folder"):
        loop.Trainer(tiny_run(other))
    assert sorted(p.name for p in out.rglob("*")) == before and (other / "notes.txt").read_text() == "mine"


def test_damaged_or_missing_checkpoint_falls_back_to_an_intact_one(tmp_path, tiny_run, capsys):
    args = ["model.kind=llama", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=3"]
    out = tmp_path / "r"
    loop.Trainer(tiny_run(out, *args)).run()
    shutil.rmtree(out / "final")  # as if killed before the export: a re-run resumes from the latest checkpoint
    first, older, latest = checkpoints(out / "checkpoints")
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (older / "process_0.json").unlink()
    capsys.readouterr()
    trainer = loop.Trainer(tiny_run(out, *args))
    err = capsys.readouterr().out
    assert f"checkpoint {latest} is not usable (model.safetensors has 100 bytes, its manifest says" in err
    assert f"checkpoint {older} is not usable (process_0.json is missing)" in err
    assert trainer.resume_from == first and trainer.step == 1
    trainer.run()
    assert [p.name for p in checkpoints(out / "checkpoints")] == [f"checkpoint-0000000{i}" for i in (1, 2, 3)]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        loop.Trainer(tiny_run(out, *args, "checkpoint.resume=/nope"))
    with pytest.raises(CheckpointError, match="is not usable .*process_0.json is missing"):  # an explicit PATH: no fall-back
        (first / "process_0.json").unlink()
        loop.Trainer(tiny_run(out, *args, f"checkpoint.resume={first}"))
    shutil.rmtree(out / "final")
    state = json.loads((latest / "trainer_state.json").read_text())
    (latest / "trainer_state.json").write_text(json.dumps(dict(state, world_size=2)))
    (latest / "manifest.json").unlink()
    write_manifest(latest)
    with pytest.raises(CheckpointError, match="written by 2 processes; resume it with the same number"):
        loop.Trainer(tiny_run(out, *args))


def test_non_finite_steps_are_skipped_then_stop_keeping_the_last_checkpoint(tmp_path, monkeypatch, tiny_run, run_metrics):
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
    trainer = loop.Trainer(tiny_run(out, "model.kind=llama", "train.max_nonfinite_steps=2", "checkpoint.every=3"))
    with pytest.raises(loop.NonFiniteLoss, match="2 consecutive non-finite steps .*set aside as checkpoint-00000003.non"):
        trainer.run()
    rows = run_metrics(out)
    assert [r.get("skipped", 0) for r in rows] == [0, 0, 0, 1]  # step 5 raised before logging
    # the checkpoint written just before the streak holds the weights that gave it: set aside, not resumed
    assert checkpoints(out / "checkpoints") == [] and not (out / "final").exists()
    saved = load_file(out / "checkpoints" / "checkpoint-00000003.nonfinite" / "model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


# ---------------------------------------------------------------- streamed sources
def _jsonl(path, n=60):
    path.write_text(
        "".join(json.dumps({"text": f"document {i}: " + "the quick brown fox " * (i % 5 + 1)}) + "\n" for i in range(n))
    )
    return path


def test_stream_position_round_trips(tmp_path):
    from train import data as D
    from train.batches import StreamBatches
    from train.tokenizer import char_tokenizer

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


def test_streamed_local_corpus_trains(tmp_path, tiny_run, run_metrics):
    src = _jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "r"
    loop.Trainer(
        tiny_run(
            out,
            "model.kind=llama",
            f"data.source={src}",
            "data.streaming=true",
            "data.val_blocks=4",
            "data.shuffle_buffer=16",
            "train.max_steps=3",
        )
    ).run()
    assert [r["step"] for r in run_metrics(out)] == [1, 2, 3] and (out / "final" / "tokenizer.json").is_file()


def test_bad_data_fails_fast_and_leaves_no_half_made_run(tmp_path, tiny_run):
    short = tmp_path / "short.txt"
    short.write_text("too short for a block")
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="no complete block"):
        loop.Trainer(tiny_run(out, f"data.source={short}"))
    assert not out.exists()  # so the corrected command may use it
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 " * 50)
    r = subprocess.run(
        [sys.executable, "-m", "train", f"output_dir={out}", f"data.source={tmp_path / 'bad.txt'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not UTF-8" in r.stderr and not out.exists()


def test_fsdp_is_refused_with_the_reason(tmp_path, monkeypatch, tiny_run):
    from accelerate import Accelerator, DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match="pytorch#172543.*multi_gpu.yaml"):
        loop.make_accelerator(tiny_run(tmp_path / "r"))
