"""The ``tokenizer`` section of a run config -> a tokenizer that saves with the model and reloads
with ``AutoTokenizer`` and no custom code (:func:`build_tokenizer`; a resumed run reloads its own
with :func:`load_tokenizer`).

Both home-made kinds are plain ``tokenizers`` pipelines wrapped in ``PreTrainedTokenizerFast``,
so ``save_pretrained`` writes a ``tokenizer.json`` that any ``transformers`` install reloads:

- ``char``: one token per character seen in the training text (tiny corpora, reasoning tasks);
  unseen characters map to ``<unk>``.
- ``sentencepiece``: trained with the ``sentencepiece`` library (BPE or unigram, identity
  normalisation, byte fallback so nothing is ever unknown), then converted to the same
  ``tokenizers`` pipeline transformers uses for Llama's SentencePiece models; the conversion is
  token-for-token identical to ``sentencepiece`` itself (tested).
- anything else: an existing tokenizer by Hub name or local path.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from train.config import TokenizerConfig

UNK = "<unk>"
BOS = "<s>"


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """A new tokenizer for a run: char / SentencePiece built from ``texts`` (at most
    ``cfg.train_chars`` characters of them are read), or an existing one (``texts`` unread)."""
    if cfg.kind == "pretrained":
        return pretrained_tokenizer(cfg.name_or_path)
    texts = take_chars(texts, cfg.train_chars)
    if cfg.kind == "char":
        return char_tokenizer(texts, eos_token=cfg.eos_token)
    return sentencepiece_tokenizer(texts, cfg.vocab_size, cfg.model_type, eos_token=cfg.eos_token)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a run saved in ``OUTPUT/tokenizer`` (resume re-uses it, never rebuilds it)."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"the run's tokenizer in {path} is unreadable ({e}); start a new output_dir") from None


def take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield texts until ``max_chars`` characters have been produced (the last one truncated)."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def _wrap(tok: Tokenizer, eos_token: str, **special: str) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, eos_token=eos_token, **special)
    hf.pad_token = hf.eos_token  # batches are packed, padding only matters for generate()
    return hf


def char_tokenizer(texts: Iterable[str], eos_token: str = "<eos>") -> PreTrainedTokenizerFast:
    """One id per distinct character of ``texts`` (sorted, after ``<unk>`` and the EOS token).

    ``eos_token`` may be a character of the text itself (e.g. ``"\\n"`` for line-per-example
    data), in which case it is not added twice.
    """
    chars = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise ValueError("cannot build a character tokenizer from empty text; check data.source")
    specials = [UNK] + ([eos_token] if eos_token not in chars else [])
    vocab = {s: i for i, s in enumerate(specials + sorted(chars))}
    # BPE without merges = character lookup; Fuse joins the characters back without spaces.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    return _wrap(tok, eos_token)


def sentencepiece_tokenizer(
    texts: Iterable[str], vocab_size: int, model_type: str = "bpe", eos_token: str = "<eos>"
) -> PreTrainedTokenizerFast:
    """Train a SentencePiece model on ``texts`` and return it as a fast ``transformers`` tokenizer.

    ``vocab_size`` is an upper bound: it must exceed the 256 byte-fallback pieces plus the
    distinct characters, and a small corpus may yield fewer pieces.
    """
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    lines = (line for text in texts for line in text.splitlines() if line.strip())
    first = next(lines, None)
    if first is None:
        raise ValueError("cannot train a SentencePiece tokenizer on empty text; check data.source")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], lines),
                model_prefix=prefix,
                vocab_size=vocab_size,
                hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
                model_type=model_type,
                byte_fallback=True,  # every byte is representable: no <unk> on new text
                normalization_rule_name="identity",  # keep text as is (decode(encode(x)) == x)
                remove_extra_whitespaces=False,
                split_digits=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                unk_piece=UNK,
                bos_piece=BOS,
                eos_piece=eos_token,
                num_threads=1,  # determinism; the corpus is capped by tokenizer.train_chars
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(
                f"SentencePiece training failed ({e}); adjust tokenizer.vocab_size (byte fallback needs 256 + "
                f"the characters; a small corpus supports only a small vocabulary)"
            ) from None
        spec = SentencePieceExtractor(prefix + ".model").extract(None)
    if model_type == "bpe":
        model = models.BPE(vocab=spec["vocab"], merges=spec["merges"], unk_token=UNK, byte_fallback=True, fuse_unk=True)
    else:
        model = models.Unigram(spec["vocab"], unk_id=spec["unk_id"], byte_fallback=True)
    # The pipeline transformers' LlamaConverter builds for SentencePiece models.
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # The <s> piece stays in the vocabulary (SentencePiece reserves it) but is not declared as
    # bos_token: training joins documents with EOS only, and clients such as lm-eval start a
    # window with bos_token when one is declared, which would condition on an unseen token.
    return _wrap(tok, eos_token)


def pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """An existing tokenizer; an EOS token is required because packing joins documents with it."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load tokenizer {name_or_path!r} ({e}); pass a local folder or a Hub name reachable from this machine"
        ) from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; packing needs one to join documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
