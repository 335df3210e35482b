"""``python -m eval reasoning``: scoring is exact (a scripted model whose answers we choose),
thinking settings reach the EBT's generate and nothing else, batching does not change answers,
and the command writes the table and JSON it promises for real (random) EBT and Llama folders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_checkpoint, tiny_ebt_config
from transformers import LlamaForCausalLM

from ebt import EBTForCausalLM, ThinkingConfig, llama_twin_config
from ebt.tasks import TASK_NAMES, check_answer, make_task
from eval import reasoning as R
from eval.__main__ import main as eval_main
from eval.common import Checkpoint
from train.tokenizer import char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """Characters of addition and Dyck, EOS = newline (as the reasoning configs train)."""
    rows = [make_task(t, "train", 300) for t in ("addition", "dyck")]
    texts = [p + a for ds in rows for p, a in zip(ds["prompt"], ds["answer"])]
    return char_tokenizer(texts, eos_token="\n")


class ScriptedModel:
    """A stand-in model: ``generate`` continues each prompt with the text ``script(prompt, thinking)``.

    It checks what the evaluator must send (EOS before the prompt, left padding, greedy, the
    length limit as ``max_length`` only, and for an "ebt" a request for the steps spent) and
    records the thinking config and energy terms it was given. As an "ebt" it reports
    ``spent(prompt, j)`` inner steps on its j-th new token up to and including the first EOS
    (all tokens without one) and 0 after it, as ``EBTGenerationMixin.generate`` does.
    """

    def __init__(self, tokenizer, script, model_type: str = "llama", spent=None):
        self.tokenizer, self.script = tokenizer, script
        self.spent = spent or (lambda prompt, j: 1)
        self.config = SimpleNamespace(model_type=model_type)
        self.think_calls: list[ThinkingConfig | None] = []
        self.term_calls: list[list] = []

    def generate(self, input_ids, attention_mask, max_length, do_sample, eos_token_id, pad_token_id, **think):
        ebt = self.config.model_type == "ebt"
        assert do_sample is False
        if ebt:
            assert think.pop("return_dict_in_generate") is True, "the evaluator reads the steps spent from the dict"
        assert set(think) <= ({"thinking", "energy_terms"} if ebt else set())
        max_new_tokens = max_length - input_ids.shape[1]
        thinking = think.get("thinking")
        self.think_calls.append(thinking)
        self.term_calls.append(think.get("energy_terms", []))
        rows, spent = [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert mask == sorted(mask), "padding must be on the left"
            real = ids[len(ids) - sum(mask) :]
            assert real[0] == eos_token_id, "every prompt follows an EOS, as in the packed training stream"
            prompt = self.tokenizer.decode(real[1:])
            new = self.tokenizer(self.script(prompt, thinking), add_special_tokens=False)["input_ids"][:max_new_tokens]
            end = new.index(eos_token_id) if eos_token_id in new else max_new_tokens
            rows.append(ids + new + [pad_token_id] * (max_new_tokens - len(new)))
            spent.append([self.spent(prompt, j) if j <= end else 0 for j in range(max_new_tokens)])
        if not ebt:
            return torch.tensor(rows)
        return SimpleNamespace(sequences=torch.tensor(rows), steps_taken=torch.tensor(spent))


def scripted(tokenizer, script, model_type: str = "llama", spent=None) -> Checkpoint:
    model = ScriptedModel(tokenizer, script, model_type, spent)
    return Checkpoint(label=model_type, path="scripted", model=model, tokenizer=tokenizer)


def true_answer(task: str, prompt: str) -> str:
    """The reference answer, re-derived for the script (not taken from the generator)."""
    if task == "addition":
        a, b = prompt[:-1].split("+")
        return str(int(a) + int(b))[::-1]
    raise NotImplementedError(task)


def test_scoring_is_exact_for_answers_we_control(tokenizer) -> None:
    data = make_task("addition", "test", 40, seed=3).to_dict()
    kinds = {}  # prompt -> what the script does with it

    def script(prompt: str, thinking) -> str:
        i = data["prompt"].index(prompt)
        kind = ("right", "wrong", "right, no EOS", "right, junk after EOS")[i % 4]
        kinds[prompt] = kind
        truth = true_answer("addition", prompt)
        wrong = str(int(truth[::-1]) + 1)[::-1]
        return {
            "right": truth + "\n",
            "wrong": wrong + "\n",
            "right, no EOS": truth + "7" * 20,  # runs past the budget without ending
            "right, junk after EOS": truth + "\n12+3=",
        }[kind]

    checkpoint = scripted(tokenizer, script)
    budget = R.answer_budget(tokenizer, data["answer"])
    answers = R.greedy_answers(checkpoint, data["prompt"], max_new_tokens=budget, batch_size=7)
    correct = R.score("addition", data["prompt"], answers)
    expected = [kinds[p] in ("right", "right, junk after EOS") for p in data["prompt"]]
    assert correct == expected
    assert sum(correct) == 20
    for prompt, answer in zip(data["prompt"], answers):
        assert answer.finished == (kinds[prompt] != "right, no EOS")
        if kinds[prompt] == "right, junk after EOS":
            assert answer.text == true_answer("addition", prompt)  # cut at the first EOS
    assert budget == max(map(len, data["answer"])) + 1


def test_an_answer_cut_off_before_its_eos_is_wrong(tokenizer) -> None:
    prompt = "357+68="
    checkpoint = scripted(tokenizer, lambda p, thinking: "524\n")
    for budget, expected in ((3, False), (4, True)):
        (answer,) = R.greedy_answers(checkpoint, [prompt], max_new_tokens=budget, batch_size=1)
        assert answer == R.Generated("524", finished=expected)
        assert R.score("addition", [prompt], [answer]) == [expected]


def test_thinking_settings_reach_the_ebt_and_become_rows(tokenizer) -> None:
    """A scripted 'EBT' that is right only with >= 4 steps and 2 samples: the rows must say so."""
    data = make_task("addition", "harder", 12, seed=0).to_dict()

    def script(prompt: str, thinking: ThinkingConfig) -> str:
        good = thinking.steps >= 4 and thinking.samples == 2 and thinking.noise == 0.5
        return (true_answer("addition", prompt) if good else "0") + "\n"

    checkpoint = scripted(tokenizer, script, model_type="ebt")
    settings = [ThinkingConfig(steps=k, samples=s, noise=0.5) for k, s in [(1, 1), (4, 1), (4, 2), (8, 2)]]
    rows = R.evaluate(checkpoint, "addition", "harder", data, settings, batch_size=5)
    got = {(r["steps"], r["samples"]): r["accuracy"] for r in rows}
    assert got == {(1, 1): 0.0, (4, 1): 0.0, (4, 2): 1.0, (8, 2): 1.0}
    assert {r["energy_passes"] for r in rows} == {3, 9, 18, 34}
    assert all(r["total"] == 12 and r["split"] == "harder" for r in rows)
    assert all(call in settings for call in checkpoint.model.think_calls)
    assert all(s in checkpoint.model.think_calls for s in settings)
    harder = set(rows[2]["accuracy_by_difficulty"])
    assert harder <= {"5", "6", "7", "8"} and harder
    assert rows[0]["outputs"] == ["0"] * 12


def test_a_model_that_cannot_think_gets_one_row_and_no_thinking_arguments(tokenizer) -> None:
    data = make_task("addition", "test", 6).to_dict()
    checkpoint = scripted(tokenizer, lambda p, thinking: true_answer("addition", p) + "\n")
    rows = R.evaluate(
        checkpoint, "addition", "test", data, [ThinkingConfig(steps=1), ThinkingConfig(steps=8, samples=4)], batch_size=4
    )
    assert len(rows) == 1 and rows[0]["steps"] is None and rows[0]["accuracy"] == 1.0
    assert rows[0]["constraint_weight"] is None and rows[0]["mean_steps"] is None and rows[0]["steps_spent"] is None
    assert all(call is None for call in checkpoint.model.think_calls)
    with pytest.raises(ValueError, match="not an EBT"):
        R.greedy_answers(checkpoint, data["prompt"], max_new_tokens=4, batch_size=4, thinking=ThinkingConfig(steps=2))


def test_steps_spent_are_the_mean_over_the_answer_up_to_and_including_its_eos(tokenizer) -> None:
    """The scripted EBT spends j + 1 steps on new token j: an answer of n characters and its EOS
    has mean (n + 2) / 2; one that never ends is averaged over the whole budget, (budget + 1) / 2.
    Counting the zeros after EOS, or leaving the EOS out, would give other numbers."""
    data = make_task("addition", "test", 30, seed=5).to_dict()
    unfinished = set(data["prompt"][::4])

    def script(prompt: str, thinking) -> str:
        truth = true_answer("addition", prompt)
        return truth + "9" * 20 if prompt in unfinished else truth + "\n"

    checkpoint = scripted(tokenizer, script, model_type="ebt", spent=lambda prompt, j: j + 1)
    rows = R.evaluate(checkpoint, "addition", "test", data, [ThinkingConfig(steps=8)], batch_size=7)
    budget = R.answer_budget(tokenizer, data["answer"])
    expected = [(budget + 1) / 2 if p in unfinished else (len(true_answer("addition", p)) + 2) / 2 for p in data["prompt"]]
    (row,) = rows
    assert row["steps_spent"] == expected
    assert row["mean_steps"] == pytest.approx(sum(expected) / len(expected))
    levels = sorted(set(data["difficulty"]))
    assert len(levels) > 1
    assert row["mean_steps_by_difficulty"] == pytest.approx(
        {
            str(level): sum(x for x, d in zip(expected, data["difficulty"]) if d == level) / data["difficulty"].count(level)
            for level in levels
        }
    )


def test_constraint_weights_reach_the_ebt_as_energy_terms_and_become_rows(tokenizer) -> None:
    """Each weight x setting is one row; a weight > 0 sends (weight, term), 0 sends none; a model
    that cannot think gets one row and no terms."""
    data = make_task("addition", "test", 5).to_dict()

    def term(probs, input_ids, attention_mask):
        raise AssertionError("the scripted model never calls it")

    settings = [ThinkingConfig(steps=1), ThinkingConfig(steps=4)]
    ebt = scripted(tokenizer, lambda p, thinking: "1\n", model_type="ebt")
    rows = R.evaluate(ebt, "addition", "test", data, settings, batch_size=5, weights=[0.0, 2.5], constraint=term)
    assert [(r["constraint_weight"], r["steps"]) for r in rows] == [(0.0, 1), (0.0, 4), (2.5, 1), (2.5, 4)]
    assert ebt.model.term_calls == [[], [], [(2.5, term)], [(2.5, term)]]
    assert ebt.model.think_calls == settings + settings
    twin = scripted(tokenizer, lambda p, thinking: "1\n")
    (row,) = R.evaluate(twin, "addition", "test", data, settings, batch_size=5, weights=[0.0, 2.5], constraint=term)
    assert row["constraint_weight"] is None and twin.model.term_calls == [[]]
    with pytest.raises(ValueError, match="without the constraint term"):
        R.evaluate(ebt, "addition", "test", data, settings, batch_size=5, weights=[1.0])


def test_unseen_characters_are_refused() -> None:
    addition_only = char_tokenizer(["12+34=64\n"], eos_token="\n")
    checkpoint = scripted(addition_only, lambda p, thinking: "\n")
    with pytest.raises(ValueError, match="not trained on this task's characters"):
        R.greedy_answers(checkpoint, ["([{=", "1+2="], max_new_tokens=4, batch_size=2)


def test_markdown_table_layout() -> None:
    rows = [
        {"task": "dyck", "model": "EBT", "split": s, "steps": k, "samples": 1, "energy_passes": 2 * k + 1, "accuracy": a}
        for s, k, a in (("test", 1, 0.5), ("harder", 1, 0.125), ("test", 4, 0.75), ("harder", 4, 0.25))
    ] + [
        {
            "task": "dyck",
            "model": "Transformer++",
            "split": "test",
            "steps": None,
            "samples": None,
            "energy_passes": None,
            "accuracy": 1.0,
        }
    ]
    assert R.results_table(rows).splitlines() == [
        "| task | model | steps | samples | energy passes / token | test acc. (%) | harder acc. (%) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        "| dyck | EBT | 1 | 1 | 3 | 50.0 | 12.5 |",
        "| dyck | EBT | 4 | 1 | 9 | 75.0 | 25.0 |",
        "| dyck | Transformer++ | - | - | - | 100.0 |  |",
    ]


def test_markdown_table_with_constraint_weights_and_steps() -> None:
    """A weight > 0 adds the weight column (the twin's is '-'); EBT rows add mean steps per split."""
    ebt = [
        {
            "task": "sudoku", "model": "EBT", "split": s, "constraint_weight": w, "steps": 4, "samples": 1,
            "energy_passes": 9, "accuracy": a, "mean_steps": m,
        }
        for w, s, a, m in ((0.0, "test", 0.5, 4.0), (0.0, "harder", 0.25, 4.0), (10.0, "test", 1.0, 2.5))
    ]  # fmt: skip
    twin = {
        "task": "sudoku", "model": "Transformer++", "split": "test", "constraint_weight": None, "steps": None,
        "samples": None, "energy_passes": None, "accuracy": 0.75, "mean_steps": None,
    }  # fmt: skip
    assert R.results_table([*ebt, twin]).splitlines() == [
        "| task | model | constraint weight | steps | samples | energy passes / token | test acc. (%) | harder acc. (%) "
        "| test mean steps | harder mean steps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| sudoku | EBT | 0 | 4 | 1 | 9 | 50.0 | 25.0 | 4.00 | 4.00 |",
        "| sudoku | EBT | 10 | 4 | 1 | 9 | 100.0 |  | 2.50 |  |",
        "| sudoku | Transformer++ | - | - | - | - | 75.0 |  | - |  |",
    ]
    plain = [{**r, "constraint_weight": 0.0} for r in ebt[:2]]
    assert "constraint weight" not in R.results_table(plain)  # no weight > 0 asked: no column


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    """Random EBT and Llama twin saved as the trainer saves them (with a generation length limit
    that fits the context). A wide init makes greedy continuations vary from token to token, so
    the batching test has something to compare."""
    root = tmp_path_factory.mktemp("reasoning")
    torch.manual_seed(0)
    config = tiny_ebt_config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, max_position_embeddings=64, initializer_range=0.5,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    for name, model in (
        ("addition-ebt", EBTForCausalLM(config)),
        ("addition-llama", LlamaForCausalLM(llama_twin_config(config))),
    ):
        model.generation_config.max_length = config.max_position_embeddings
        save_checkpoint(root / name, model, tokenizer)
    return root


@pytest.mark.parametrize(
    "name, think", [("addition-ebt", {"thinking": ThinkingConfig(steps=2, samples=2)}), ("addition-llama", {})]
)
def test_batching_does_not_change_answers(folders, name: str, think: dict) -> None:
    checkpoint = R.load(str(folders / name))
    checkpoint.model.double()  # no near-ties between padded and unpadded arithmetic
    prompts = list(make_task("addition", "test", 9, seed=1)["prompt"]) + list(make_task("addition", "harder", 3)["prompt"])
    one = R.greedy_answers(checkpoint, prompts, max_new_tokens=6, batch_size=1, **think)
    many = R.greedy_answers(checkpoint, prompts, max_new_tokens=6, batch_size=5, **think)
    assert one == many
    assert len({a.text for a in one}) > 1  # the model's answers differ between prompts


def test_command_writes_table_and_results(folders, tmp_path, capfd) -> None:
    out = tmp_path / "results" / "reasoning.json"  # the folder is created
    argv = [
        "reasoning", "--model", str(folders / "{task}-ebt"), "--twin", str(folders / "{task}-llama"),
        "--task", "addition", "--split", "test,harder", "--steps", "1,2", "--samples", "1,2", "--think-noise", "0.5",
        "--num-examples", "6", "--output", str(out),
    ]  # fmt: skip
    assert eval_main(argv) == 0
    table, err = capfd.readouterr()
    # the length limit goes as max_length only: no "Both `max_new_tokens` and `max_length`" warning
    # from transformers (the folders' generation configs set max_length, as the trainer exports)
    assert "max_new_tokens" not in err
    saved = json.loads(out.read_text())
    assert saved["table"] in table and saved["thinking"] == {"noise": 0.5}
    rows = saved["results"]
    # 4 EBT settings + 1 twin row, for each of 2 splits
    assert len(rows) == 10
    assert sorted((r["model"], r["steps"], r["samples"]) for r in rows if r["split"] == "harder") == [
        ("EBT", 1, 1), ("EBT", 1, 2), ("EBT", 2, 1), ("EBT", 2, 2), ("Transformer++", None, None),
    ]  # fmt: skip
    for r in rows:
        data = make_task("addition", r["split"], 6, seed=0)
        rescored = [
            i not in r["no_eos"] and check_answer("addition", p, text)
            for i, (p, text) in enumerate(zip(data["prompt"], r["outputs"]))
        ]
        assert r["correct"] == sum(rescored) and r["accuracy"] == sum(rescored) / 6
    assert table.count("| addition | EBT |") == 4 and table.count("| addition | Transformer++ |") == 1
    # no tolerance: every problem spends exactly the asked steps on each token; the twin spends none
    for r in rows:
        expected = [r["steps"]] * 6 if r["model"] == "EBT" else None
        assert r["steps_spent"] == expected and r["mean_steps"] == (r["steps"] if expected else None)
        assert r["constraint_weight"] == (0.0 if expected else None)
    assert "| test mean steps | harder mean steps |" in table and "constraint weight" not in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "multiplication"], "unknown task/split"),
        (["--task", "addition", "--split", "dev"], "unknown task/split"),
        (["--task", "dyck", "--model", "/nonexistent/model"], "not a model folder"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(folders, capsys, extra: list[str], message: str) -> None:
    argv = ["reasoning", "--model", str(folders / "addition-ebt"), "--num-examples", "2"] + extra
    assert eval_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("task", TASK_NAMES)
def test_reasoning_configs_train_ebt_and_twin_alike(task: str) -> None:
    """configs/reasoning/<task>-{ebt,llama}.yaml differ only in the model kind and run folder."""
    from dataclasses import asdict

    from train.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "reasoning"
    ebt_cfg, twin_cfg = (asdict(load_config(root / f"{task}-{kind}.yaml")) for kind in ("ebt", "llama"))
    assert (ebt_cfg["model"].pop("kind"), twin_cfg["model"].pop("kind")) == ("ebt", "llama")
    assert ebt_cfg.pop("output_dir") != twin_cfg.pop("output_dir")
    # the EBT's recipe (ebt.recipes) and any EBT fields on top of it; the twin has neither
    assert ebt_cfg["model"].pop("recipe") and not twin_cfg["model"].pop("recipe")
    assert ebt_cfg["model"].pop("ebt") is not None and not twin_cfg["model"].pop("ebt")
    for cfg in (ebt_cfg, twin_cfg):
        cfg["eval"].pop("think_steps")  # the EBT's extra validation losses; no effect on training
    assert ebt_cfg == twin_cfg  # same sizes, tokenizer, data, schedule, hence the same tokens
    assert ebt_cfg["data"]["source"] == "tasks" and ebt_cfg["data"]["tasks"] == [task]
    assert ebt_cfg["train"]["replay_buffer_size"] == 0  # replayed rows would give the EBT extra rows


# ------------------------------------------------------------------ joint-mode EBT and constraint energies


@pytest.fixture(scope="module")
def sudoku_tokenizer():
    """Characters of Sudoku and addition (a task without a constraint energy), EOS = newline."""
    rows = [make_task(t, "train", 300) for t in ("sudoku", "addition")]
    return char_tokenizer([p + a for ds in rows for p, a in zip(ds["prompt"], ds["answer"])], eos_token="\n")


@pytest.fixture(scope="module")
def joint_folders(sudoku_tokenizer, tmp_path_factory):
    """Random joint-mode EBTs saved as the trainer saves them: blocks of 5 (a Sudoku answer and its
    EOS, 17 tokens, take four blocks) and of 17 (one block), with the Llama twin of the latter.
    Mirror steps as in configs/reasoning/sudoku-joint.yaml: they accumulate the gradient in the
    logits, so a dominant constraint energy is descended until it is (nearly) zero."""
    root = tmp_path_factory.mktemp("joint")
    tok = sudoku_tokenizer
    for block in (5, 17):
        torch.manual_seed(0)
        config = tiny_ebt_config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=32, max_position_embeddings=64, initializer_range=0.5,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, joint_block_size=block, update_rule="mirror",
        )  # fmt: skip
        model = EBTForCausalLM(config)
        model.generation_config.max_length = config.max_position_embeddings
        save_checkpoint(root / f"joint{block}", model, tok)
    twin = LlamaForCausalLM(llama_twin_config(config))
    twin.generation_config.max_length = config.max_position_embeddings
    save_checkpoint(root / "llama", twin, tok)
    return root


def run_json(argv: list[str], out: Path) -> dict:
    assert eval_main(["reasoning", *argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_joint_checkpoint_answers_as_its_own_greedy_generate(joint_folders, tmp_path) -> None:
    """Block after block (the budget is four blocks), cut at EOS, the steps asked on every token."""
    folder = str(joint_folders / "joint5")
    argv = ["--model", folder, "--task", "sudoku", "--split", "test,harder", "--steps", "3", "--samples", "1"]
    saved = run_json([*argv, "--num-examples", "8"], tmp_path / "joint.json")
    checkpoint = R.load(folder)
    tok = checkpoint.tokenizer
    lengths = []
    for row in saved["results"]:
        data = make_task("sudoku", row["split"], 8, seed=0).to_dict()
        budget = R.answer_budget(tok, data["answer"])
        assert budget > checkpoint.model.config.joint_block_size
        # every Sudoku prompt has the same length: one unpadded batch, as the evaluator sends it
        ids = torch.tensor(R.encode_prompts(tok, data["prompt"]))
        with torch.no_grad():
            new = checkpoint.model.generate(ids, max_new_tokens=budget, thinking=ThinkingConfig(steps=3, samples=1))
        new = new[:, ids.shape[1] :].tolist()
        eos = tok.eos_token_id
        assert row["outputs"] == [tok.decode(n[: n.index(eos)] if eos in n else n) for n in new]
        assert row["no_eos"] == [i for i, n in enumerate(new) if eos not in n]
        assert row["steps_spent"] == [3.0] * 8 and row["mean_steps"] == 3.0
        assert set(row["mean_steps_by_difficulty"].values()) == {3.0}
        lengths += [n.index(eos) if eos in n else budget for n in new]
    assert max(lengths) > 5  # some answer took more than one block
    assert min(lengths) < budget  # and some was cut at its EOS


def keeps_givens(prompt: str, answer: str) -> bool:
    """Whether the answer's first 16 characters repeat every given digit of the 4x4 board."""
    return len(answer) >= 16 and all(g in (".", a) for g, a in zip(prompt[:16], answer))


def test_a_large_constraint_weight_keeps_the_givens(joint_folders, tmp_path) -> None:
    """The Sudoku energy adds (1 - p_cell(given))^2 for every given and is convex in the
    probabilities, zero only where every given is certain: with a weight that dwarfs the random
    model's energy, descending it keeps all givens. The random model alone keeps them by chance
    only. The twin is evaluated once, without it."""
    argv = [
        "--model", str(joint_folders / "joint17"), "--twin", str(joint_folders / "llama"), "--task", "sudoku",
        "--split", "test", "--num-examples", "12", "--steps", "64", "--samples", "1", "--step-size", "1",
        "--constraint-weight", "0,1000",
    ]  # fmt: skip
    saved = run_json(argv, tmp_path / "constraint.json")
    prompts = make_task("sudoku", "test", 12, seed=0)["prompt"]
    kept = {r["constraint_weight"]: sum(keeps_givens(p, a) for p, a in zip(prompts, r["outputs"])) for r in saved["results"]}
    assert kept[1000.0] == 12 and kept[0.0] < 12
    twin = [r for r in saved["results"] if r["model"] == "Transformer++"]
    assert len(twin) == 1 and twin[0]["constraint_weight"] is None and twin[0]["steps"] is None
    assert saved["constraint_weights"] == [0.0, 1000.0]
    assert "| sudoku | EBT | 1000 | 64 | 1 |" in saved["table"] and "| sudoku | Transformer++ | - |" in saved["table"]


def test_a_tolerance_stops_problems_early(joint_folders) -> None:
    """Residual halting: a problem stops once a step moves no probability by the tolerance or
    more, so with an unreachable tolerance every problem stops after its first step, and with a
    moderate one each spends between 1 and the steps asked."""
    checkpoint = R.load(str(joint_folders / "joint17"))
    data = make_task("sudoku", "harder", 10, seed=0).to_dict()
    settings = [ThinkingConfig(steps=8, samples=1, halting="residual", tolerance=t) for t in (1e9, 0.05)]
    never, moderate = R.evaluate(checkpoint, "sudoku", "harder", data, settings, batch_size=10)
    assert never["steps_spent"] == [1.0] * 10 and never["mean_steps"] == 1.0
    assert all(1 <= s <= 8 for s in moderate["steps_spent"]) and moderate["mean_steps"] <= 8


@pytest.mark.parametrize(
    "folder, task, weights, message",
    [
        ("addition-ebt", "addition", "0,2", "is an autoregressive EBT (joint_block_size=0)"),
        ("joint17", "addition", "1", "tasks with a built-in energy: sorting, sudoku, sudoku6"),
        ("joint5", "sudoku", "1", "the whole answer must fit one block"),
    ],
)
def test_constraint_weights_that_cannot_run_exit_2(
    folders, joint_folders, capsys, folder: str, task: str, weights: str, message: str
) -> None:
    path = (folders if folder == "addition-ebt" else joint_folders) / folder
    argv = ["reasoning", "--model", str(path), "--task", task, "--num-examples", "2", "--constraint-weight", weights]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and f"--constraint-weight {weights}" in err


@pytest.mark.parametrize("weights", ["-1", "0,nan", "inf"])
def test_constraint_weights_must_be_finite_and_not_negative(folders, capsys, weights: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        eval_main(
            ["reasoning", "--model", str(folders / "addition-ebt"), "--task", "addition", "--constraint-weight", weights]
        )
    assert exit_.value.code == 2 and "--constraint-weight" in capsys.readouterr().err
