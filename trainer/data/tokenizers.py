"""Text -> token ids, in the tf.data graph (tensorflow-text).

BERT-uncased WordPiece from a vocab file, as OpenVision: [PAD] = 0, and ids 1 and 2 ([unused0], [unused1] in BERT's
vocab; [bos], [eos] in vocabularies built here) are begin and end of sequence. Ids are the encoder's alt-text (truncated
to the context length with [eos] last) or the decoder's target caption; 0 pads.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_text as tf_text

from trainer.data.tfsetup import tf

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
RESERVED = ["[PAD]", "[bos]", "[eos]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class WordPiece:
    def __init__(self, vocab_file: str):
        if not tf.io.gfile.exists(vocab_file):
            raise FileNotFoundError(vocab_file)
        self.vocab_file = vocab_file
        with tf.io.gfile.GFile(vocab_file) as fh:
            self.size = sum(1 for line in fh if line.strip())
        self.tokenizer = tf_text.BertTokenizer(vocab_file, lower_case=True, token_out_type=tf.int32)

    def batch(self, texts: tf.Tensor, length: int) -> tf.Tensor:
        """(B,) strings -> (B, length) int32, each: its word pieces (at most length - 1), [eos], then padding."""
        pieces = self.tokenizer.tokenize(texts).merge_dims(-2, -1)[:, : length - 1]
        eos = tf.fill([tf.shape(texts)[0], 1], EOS_ID)
        ids = tf.concat([pieces, tf.RaggedTensor.from_tensor(eos)], axis=1)
        return ids.to_tensor(default_value=PAD_ID, shape=[None, length])


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
