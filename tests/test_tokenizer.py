"""Tokenizers: exact round trips, SentencePiece parity, reload with AutoTokenizer."""

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from train.config import TokenizerConfig
from train.tokenizer import build_tokenizer, char_tokenizer, load_tokenizer, sentencepiece_tokenizer, take_chars

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.  1234\n" * 40


def test_char_round_trip_and_reload(tmp_path):
    tok = char_tokenizer([TEXT])
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character
    assert tok.decode(ids) == TEXT
    assert len(tok) == len(set(TEXT)) + 2  # <unk>, <eos>
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXT)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id
    assert again.decode(again("XQ")["input_ids"]) == "<unk><unk>"  # unseen characters


def test_char_eos_may_be_a_character_of_the_text():
    tok = char_tokenizer(["ab\n"], eos_token="\n")
    assert len(tok) == 4 and tok.convert_ids_to_tokens(tok.eos_token_id) == "\n"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_matches_sentencepiece_and_reloads(tmp_path, model_type):
    tok = sentencepiece_tokenizer([TEXT], vocab_size=400, model_type=model_type)
    sample = "Before we proceed, speak 42 times.\n  x é"  # unseen 'é' goes through byte fallback
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == sample
    # Parity with the sentencepiece library itself, trained identically.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for ln in TEXT.splitlines() if ln.strip()]),
        model_prefix=str(tmp_path / "ref"),
        vocab_size=400,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="<eos>",
        num_threads=1,
        minloglevel=2,
    )
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "ref.model"))
    assert ids == ref.encode(sample)
    tok.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(sample, add_special_tokens=False)["input_ids"] == ids


def test_empty_text_is_refused():
    with pytest.raises(ValueError, match="empty"):
        char_tokenizer([""])
    with pytest.raises(ValueError, match="empty"):
        sentencepiece_tokenizer(["\n\n"], vocab_size=50)


def test_take_chars_caps_the_corpus():
    assert "".join(take_chars(["abc", "defg", "hij"], 5)) == "abcde"


def test_build_from_the_tokenizer_section_reads_at_most_train_chars(tmp_path):
    tok = build_tokenizer(TokenizerConfig(kind="char", train_chars=5), iter(["abc", "defg", "hij"]))
    assert set(tok.get_vocab()) == {"<unk>", "<eos>", *"abcde"}
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="unreadable"):
        load_tokenizer(tmp_path / "missing")
