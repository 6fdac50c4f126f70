"""Text -> token ids for the tf.data pipeline: one vectorized call per batch of strings.

- `bert_wordpiece` (OpenVision): BERT-uncased WordPiece from a vocab file (tensorflow-text's FastBertTokenizer, in the
  graph; same ids as its BertTokenizer at a sixth of the cost). [PAD] = 0; ids 1 and 2 ([unused0], [unused1] in BERT's
  vocab; [bos], [eos] in vocabularies built here and in OpenVision's bert_base_vocab_bos_eos.txt) begin and end a
  sequence. An encoder row (text.row): word pieces, [eos], padding ("eos"); or OpenVision's ("bos_eos_cls"): [bos],
  word pieces, [eos], padding, and [CLS] last, where the text tower pools (its bert_ops.my_bert_tokenize); or
  open_clip's (Hugging Face's BERT tokenizer, which open_clip's configs of BERT-tokenized models name): [CLS], word
  pieces, [SEP] ("cls_sep") or the [SEP] stripped to padding ("cls_pad"), padding. A caption row (the decoder's
  targets): word pieces, [eos], padding, whatever the encoder's.
- `clip_bpe` (OpenAI CLIP / open_clip): byte-level BPE from CLIP's merges file (shipped: trainer/data/vocab/), run by
  Hugging Face `tokenizers` (Rust) inside the pipeline as a numpy function. keras_hub's in-graph BPE was measured at
  540-920 us per caption here (vs 30) and splits digit runs unlike CLIP. A row: <start_of_text>, BPE ids,
  <end_of_text>, zeros, as open_clip; text cleaning is NFC, whitespace collapsed, lower case (open_clip also runs ftfy
  and html.unescape, which only matter for mojibake and entities).
Either way the row is truncated to the context length with the end token kept last.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Protocol

import numpy as np

from trainer import storage
from trainer.data.tfsetup import tf, tf_text
from trainer.recipe import Recipe, RecipeError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
RESERVED = ["[PAD]", "[bos]", "[eos]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLIP_VOCAB = str(Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz")
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses from its file (the rest of the file is unused)
CLIP_SPLIT = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokenizer(Protocol):
    size: int  # ids in use: the text tower's table needs at least this many rows

    def batch(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        """(B,) strings -> (B, length) int32 encoder rows (text.row), zero-padded."""
        ...

    def captions(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        """(B,) strings -> (B, length) int32 decoder targets, zero-padded."""
        ...


class WordPiece:
    def __init__(self, vocab_file: str, row: str = "eos"):
        vocab = [line for line in read_file(vocab_file).decode("utf-8").split("\n") if line.strip()]
        self.size = len(vocab)
        self.row = row
        needs = {"eos": [], "bos_eos_cls": ["[CLS]"], "cls_pad": ["[CLS]"], "cls_sep": ["[CLS]", "[SEP]"]}[row]
        for token in needs:
            if token not in vocab:
                raise RecipeError(f'text.row = "{row}" needs {token}: text.vocab = "{vocab_file}" has none')
        self.cls_id = vocab.index("[CLS]") if needs else -1
        self.sep_id = vocab.index("[SEP]") if "[SEP]" in needs else PAD_ID
        self.tokenizer = tf_text.FastBertTokenizer(vocab, lower_case_nfd_strip_accents=True, token_out_type=tf.int32)

    def batch(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        if self.row == "eos":
            return self.captions(texts, length)
        count = tf.shape(texts)[0]
        pieces = self.tokenizer.tokenize(texts).merge_dims(1, -1)
        cls = tf.RaggedTensor.from_tensor(tf.fill([count, 1], self.cls_id))
        if self.row in ("cls_sep", "cls_pad"):  # Hugging Face's: cut to length - 2 pieces, [SEP] (or 0) after
            sep = tf.RaggedTensor.from_tensor(tf.fill([count, 1], self.sep_id))
            ids = tf.concat([cls, pieces[:, : length - 2], sep], axis=1)
            return ids.to_tensor(default_value=PAD_ID, shape=[None, length])
        # OpenVision's: [bos] pieces [eos] truncated to length - 1 with [eos] kept last, padded, then [CLS]
        bos, eos = (tf.RaggedTensor.from_tensor(tf.fill([count, 1], i)) for i in (BOS_ID, EOS_ID))
        ids = tf.concat([bos, pieces[:, : length - 3], eos], axis=1).to_tensor(
            default_value=PAD_ID, shape=[None, length - 1]
        )
        return tf.concat([ids, cls.to_tensor()], axis=1)

    def captions(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        pieces = self.tokenizer.tokenize(texts).merge_dims(1, -1)[:, : length - 1]
        eos = tf.fill([tf.shape(texts)[0], 1], EOS_ID)
        ids = tf.concat([pieces, tf.RaggedTensor.from_tensor(eos)], axis=1)
        return ids.to_tensor(default_value=PAD_ID, shape=[None, length])


def read_file(location: str) -> bytes:
    """A vocab or merges file, local or gs:// (a missing one raises FileNotFoundError)."""
    path = storage.at(location)
    if not path.is_file():
        raise FileNotFoundError(location)
    return path.read_bytes()


def clip_byte_alphabet() -> list[str]:
    """CLIP's (= GPT-2's) reversible byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other bytes get the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


class ClipBpe:
    def __init__(self, merges_file: str = CLIP_VOCAB):
        import tokenizers
        from tokenizers import models, normalizers, pre_tokenizers

        raw = read_file(merges_file)
        lines = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8").split("\n")
        merges = [(a, b) for a, b in (line.split() for line in lines[1 : CLIP_MERGES + 1] if line.strip())]
        chars = clip_byte_alphabet()
        words = [c + "</w>" for c in chars]  # a character that ends a word
        vocab = [*chars, *words, *("".join(m) for m in merges), "<start_of_text>", "<end_of_text>"]
        self.size = len(vocab)
        self.bos_id, self.eos_id = self.size - 2, self.size - 1
        bpe = models.BPE(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>")
        self.tokenizer = tokenizers.Tokenizer(bpe)
        self.tokenizer.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
                normalizers.Strip(),
                normalizers.Lowercase(),
            ]
        )
        split = pre_tokenizers.Split(tokenizers.Regex(CLIP_SPLIT), behavior="removed", invert=True)
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    def encode(self, texts: list[str], length: int) -> np.ndarray:
        out = np.zeros((len(texts), length), np.int32)
        for row, encoding in zip(out, self.tokenizer.encode_batch(texts, add_special_tokens=False), strict=True):
            ids = [self.bos_id, *encoding.ids[: length - 2], self.eos_id]
            row[: len(ids)] = ids
        return out

    def captions(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        return self.batch(texts, length)

    def batch(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        def encode(raw: np.ndarray) -> np.ndarray:
            return self.encode([t.decode("utf-8", "replace") for t in raw], length)

        ids = tf.numpy_function(encode, [texts], tf.int32, stateful=False)
        ids.set_shape([None, length])
        return ids


def from_recipe(recipe: Recipe) -> Tokenizer:
    """The recipe's tokenizer, or a one-line RecipeError saying what to fix."""
    t = recipe.text
    tokenizer: Tokenizer
    try:
        if t.tokenizer == "clip_bpe":
            tokenizer = ClipBpe(t.vocab or CLIP_VOCAB)
        elif not t.vocab:
            raise RecipeError(
                "text.vocab is empty: give a WordPiece vocab file (OpenVision uses bert-base-uncased's vocab.txt) or"
                " build one: python -m trainer.data.prepare vocab SHARDS --out vocab.txt"
            )
        else:
            tokenizer = WordPiece(t.vocab, t.row)
    except FileNotFoundError:
        raise RecipeError(f'text.vocab = "{t.vocab}" does not exist') from None
    except OSError as error:  # a bucket that cannot be read
        raise RecipeError(f'text.vocab = "{t.vocab}" cannot be read: {storage.describe(error)}') from None
    if tokenizer.size > t.vocab_rows:
        raise RecipeError(
            f"text.vocab_rows = {t.vocab_rows} is less than the {tokenizer.size} ids of {t.tokenizer}"
            f" ({t.vocab or CLIP_VOCAB})"
        )
    return tokenizer


def build_vocab(texts: tf.data.Dataset, size: int, out: Path) -> int:
    """A WordPiece vocabulary learned from a dataset of strings (tensorflow-text's BERT vocab builder)."""
    from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bert_vocab

    vocab = bert_vocab.bert_vocab_from_dataset(
        texts.batch(1024).prefetch(2),
        vocab_size=size,
        reserved_tokens=RESERVED,
        bert_tokenizer_params={"lower_case": True},
        learn_params={},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(vocab) + "\n")
    return len(vocab)
