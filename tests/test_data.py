"""Data: every local format, masks that survive packing, deterministic splits, clear errors."""

import json

import datasets
import pytest

from train import data as D
from train.tokenizer import char_tokenizer

DOCS = ["the cat sat on the mat", "a dog barked twice", "birds sing at dawn", "rain fell all night long"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(DOCS + ["0123456789+="])


def _blocks(ds, tok, size, **cols):
    return D.pack(D.tokenize(ds, tok, **cols), size)


def test_documents_joined_by_eos_and_packed(tok):
    ds = datasets.Dataset.from_dict({"text": DOCS})
    blocks = _blocks(ds, tok, 8)
    flat = [t for row in blocks["input_ids"] for t in row]
    expected = [t for d in DOCS for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert all(len(row) == 8 for row in blocks["input_ids"])
    assert flat == expected[: len(expected) // 8 * 8]  # only the last partial block is dropped
    assert blocks["labels"] == blocks["input_ids"]  # plain text: every token scored


def test_prompt_tokens_are_masked_after_packing(tok):
    ds = datasets.Dataset.from_dict({"prompt": ["12+34=", "3+4="] * 6, "answer": ["46", "7"] * 6})
    blocks = _blocks(ds, tok, 16, prompt_column="prompt", answer_column="answer")
    ids = [t for row in blocks["input_ids"] for t in row]
    labels = [t for row in blocks["labels"] for t in row]
    chars = ["$" if t == tok.eos_token_id else tok.convert_ids_to_tokens(t) for t in ids]
    scored = "".join(c if lab != D.IGNORE else "_" for c, lab in zip(chars, labels))
    # prompts masked; answers and the EOS after them scored, across block boundaries
    assert scored.startswith("______46$____7$______46$")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_local_formats_with_configurable_column(tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(DOCS) + "\n")
        ds = D.load_source(str(path), sample_by="line")
        column = "text"
    else:
        column = "body"
        datasets.Dataset.from_dict({column: DOCS, "id": list(range(4))}).to_pandas().pipe(
            lambda df: (
                df.to_json(path, orient="records", lines=True)
                if fmt == "jsonl"
                else df.to_csv(path, index=False)
                if fmt == "csv"
                else df.to_parquet(path)
            )
        )
        ds = D.load_source(str(path))
    assert list(D.iter_texts(ds, [column])) == DOCS


def test_text_file_as_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    ds = D.load_source(str(tmp_path / "a.txt"))
    assert ds["text"] == ["line one\nline two\n"]


def test_streaming_gives_the_same_blocks(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 5))
    eager = _blocks(D.load_source(str(path)), tok, 8)
    streamed = _blocks(D.load_source(str(path), streaming=True), tok, 8)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [r["input_ids"] for r in streamed] == eager["input_ids"]


def test_tail_split_is_the_last_fraction_in_order():
    blocks = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(20)]})
    train, val = D.tail_split(blocks, 0.1)
    assert train["input_ids"] == [[i] for i in range(18)] and val["input_ids"] == [[18], [19]]
    with pytest.raises(ValueError, match="too little"):
        D.tail_split(blocks.select([0]), 0.1)


def test_task_mixture_is_deterministic():
    a = D.task_mixture(["addition", "dyck"], "train", 30, seed=3)
    b = D.task_mixture(["addition", "dyck"], "train", 30, seed=3)
    assert len(a) == 60 and a["prompt"] == b["prompt"] and "+" in "".join(a["prompt"]) and "(" in "".join(a["prompt"])
    with pytest.raises(ValueError, match="choose one or more"):
        D.task_mixture(["nope"], "train", 3, seed=0)


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        D.load_source(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        D.load_source(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        D.load_source(str(tmp_path / "latin1.txt"))
    ds = datasets.Dataset.from_dict({"body": DOCS})
    with pytest.raises(ValueError, match="not in the data"):
        D.tokenize(ds, char_tokenizer(DOCS), text_column="text")


def test_data_section_to_blocks_holds_out_the_tail_of_a_text_file(tmp_path, tok):
    from train.config import DataConfig

    path = tmp_path / "a.txt"
    path.write_text(" ".join(DOCS) * 20)
    cfg = DataConfig(source=str(path), block_size=8, val_fraction=0.1)
    raw = D.read_split(cfg, "train", seed=0)
    assert "".join(D.texts(cfg, raw)) == path.read_text()
    blocks = D.build_blocks(cfg, tok, raw, seed=0)
    whole = D.pack(D.tokenize(raw, tok), 8)["input_ids"]
    assert list(blocks.train["input_ids"]) + [row.tolist() for row in blocks.val["input_ids"]] == list(whole)
    assert len(blocks.val) == round(len(whole) * 0.1)
