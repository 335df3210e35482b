"""``data.answer_block``: one prompt/answer example per row, the answer in a fixed, fully scored block.

The layout (left-padded prompt part after one EOS, answer then EOS padding), its errors, its
config rules, and the Llama twin training and validating on it with the padding masked.
"""

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from train import data as D
from train import loop
from train.batches import StreamBatches
from train.config import ConfigError, DataConfig, ModelConfig, load_config
from train.hooks import build_model
from train.tokenizer import char_tokenizer

PROMPTS, ANSWERS = ["12+34=", "3+4="], ["46", "7"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(["0123456789+=()[]{}"])


def _rows(tok, block_size=12, answer_block=4, prompts=PROMPTS, answers=ANSWERS):
    ds = datasets.Dataset.from_dict({"q": prompts, "a": answers})
    return D.answer_rows(ds, tok, block_size=block_size, answer_block=answer_block, prompt_column="q", answer_column="a")


def _show(tok, ids: list[int]) -> str:
    """Ids as text: ``$`` for EOS, ``.`` for a pad id other than EOS, ``_`` for IGNORE."""
    special = {tok.eos_token_id: "$", D.IGNORE: "_"}
    if tok.pad_token_id != tok.eos_token_id:
        special[tok.pad_token_id] = "."
    return "".join(special.get(t) or tok.convert_ids_to_tokens(t) for t in ids)


def test_row_layout_left_pads_the_prompt_and_scores_the_whole_block(tok):
    padded = copy.deepcopy(tok)
    padded.pad_token = "<unk>"  # a pad id other than EOS, so padding and the prompt's EOS tell apart
    rows = _rows(padded)
    assert rows.column_names == ["input_ids", "labels", "attention_mask"]
    assert [_show(padded, r) for r in rows["input_ids"]] == [".$12+34=46$$", "...$3+4=7$$$"]
    assert [_show(padded, r) for r in rows["labels"]] == ["________46$$", "________7$$$"]
    assert rows["attention_mask"] == [[0] + [1] * 11, [0] * 3 + [1] * 9]
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None  # then EOS pads
    assert _rows(no_pad)["input_ids"][1] == [tok.eos_token_id] * 3 + rows["input_ids"][1][3:]


def test_task_rows_decode_back_to_their_examples(tok):
    cfg = DataConfig(tasks=["addition", "dyck"], task_examples=3, task_val_examples=2, block_size=32, answer_block=6)
    raw = D.read_split(cfg, "train", seed=0)
    blocks = D.build_blocks(cfg, tok, raw, seed=0)
    val_raw = D.read_split(cfg, "val", seed=0)
    for split, examples in ((blocks.train, raw), (blocks.val.with_format(None), val_raw)):
        assert len(split) == len(examples) and split.column_names == ["input_ids", "labels", "attention_mask"]
        for row, ex in zip(split, examples):
            real = [t for t, keep in zip(row["input_ids"], row["attention_mask"]) if keep]
            end = "$" * (6 - len(ex["answer"]))
            assert _show(tok, real) == "$" + ex["prompt"] + ex["answer"] + end
            assert _show(tok, row["labels"]) == "_" * 26 + ex["answer"] + end


def test_too_long_answer_or_prompt_names_the_example_and_the_setting(tok):
    with pytest.raises(ValueError, match=r"train example 1 \(answer '12345'\).*5 tokens.*data.answer_block=4.*at least 6"):
        _rows(tok, answers=["46", "12345"])
    prompt_error = r"example 0 \(prompt '12\+34='\).*7 tokens.*room for 6.*data.block_size to at least 11"
    with pytest.raises(ValueError, match=prompt_error):
        _rows(tok, block_size=10)
    long = "1+" * 40 + "="
    with pytest.raises(ValueError, match=r"prompt '(1\+){28}1\.\.\.'"):  # shortened in the message
        _rows(tok, prompts=[long, "3+4="])


def test_answer_block_config_rules(tok):
    with pytest.raises(ConfigError, match="data.source='book.txt' is plain text.*prompt_column"):
        load_config(None, ["data.source=book.txt", "data.answer_block=4"])
    with pytest.raises(ConfigError, match="must be >= 2"):
        load_config(None, ["data.answer_block=1"])
    with pytest.raises(ConfigError, match="no room for the prompt in data.block_size=8"):
        load_config(None, ["data.block_size=8", "data.answer_block=8"])
    assert load_config(None, ["data.source=qa.jsonl", "data.prompt_column=q", "data.answer_column=a", "data.answer_block=4"])
    # a hand-made DataConfig (no load_config) is refused just as clearly when the rows are built
    text = datasets.Dataset.from_dict({"text": ["12+34=46"]})
    with pytest.raises(ConfigError, match="plain text"):
        D.build_blocks(DataConfig(source="book.txt", answer_block=4), tok, text, seed=0)


def test_streamed_rows_keep_their_mask(tok):
    stream = _rows(tok).to_iterable_dataset()
    batch = StreamBatches(stream, rank=0, world=1, seed=0, shuffle_buffer=0).micro(0, 0, 2)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["attention_mask"].tolist() == _rows(tok)["attention_mask"]


def _tiny_llama(tok):
    sizes = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="llama", **sizes), tok).eval()


@torch.no_grad()
def test_llama_sees_a_masked_row_as_its_unpadded_example_and_scores_the_block(tok):
    model = _tiny_llama(tok)
    rows = _rows(tok).with_format("torch")[:]
    out = model(**rows)
    for i, mask in enumerate(rows["attention_mask"].bool()):
        alone = model(rows["input_ids"][i][mask][None]).logits[0]
        assert torch.allclose(out.logits[i][mask], alone, atol=1e-5)  # the padding is invisible (RoPE is relative)
    unmasked = model(rows["input_ids"]).logits
    assert not torch.allclose(unmasked[1][3:], out.logits[1][3:], atol=1e-3)  # ... and only thanks to the mask
    # HF's shift: block position j is predicted from position j - 1, the first from the prompt's last token
    room = 12 - 4
    manual = F.cross_entropy(out.logits[:, room - 1 : -1].flatten(0, 1), rows["input_ids"][:, room:].flatten())
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_llama_trains_and_validates_on_answer_block_rows(tmp_path, tiny_run):
    out = tmp_path / "r"
    rows = ["data.tasks=[addition]", "data.answer_block=6"]
    cfg = tiny_run(out, "model.kind=llama", *rows, "train.max_steps=2", "eval.every=2")
    trainer = loop.Trainer(cfg)
    assert sorted(trainer.batches.micro(0, 0, 4)) == ["attention_mask", "input_ids", "labels"]  # reaches model(**mb)
    metrics = trainer.run()
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    sums = torch.zeros(3)
    with torch.no_grad():
        for batch in trainer.val:
            n = loop.scored(batch["labels"])
            assert n == 6 * len(batch["labels"])  # every block position, no prompt token
            sums += torch.tensor([model(**batch).loss * n, model(batch["input_ids"], labels=batch["labels"]).loss * n, n])
    assert metrics["val/loss"] == pytest.approx(float(sums[0] / sums[2]), rel=1e-5)  # validation passed the mask
    assert metrics["val/loss"] != pytest.approx(float(sums[1] / sums[2]), rel=1e-4)  # which matters
