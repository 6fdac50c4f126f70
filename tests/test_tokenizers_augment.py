"""Tokenizer ids against known values (CLIP's published BPE ids; a WordPiece vocab written here) and the device-side
colour jitter's maps on hand-checkable cases."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from trainer import augment, recipe
from trainer.data import tokenizers
from trainer.data.tfsetup import tf

SOT, EOT = 49406, 49407


@pytest.fixture(scope="session")  # not module: CI's two xdist workers interleave the modules' tests
def clip_bpe():
    return tokenizers.ClipBpe()


def test_clip_bpe_gives_clips_ids(clip_bpe):
    # the ids of CLIP's own tokenizer for these (its README's example, and a caption)
    texts = tf.constant(["a diagram", "a dog", "a photo of a cat", "A  Photo of a CAT.", "123"])
    ids = clip_bpe.batch(texts, 8).numpy().tolist()
    assert ids == [
        [SOT, 320, 22697, EOT, 0, 0, 0, 0],
        [SOT, 320, 1929, EOT, 0, 0, 0, 0],
        [SOT, 320, 1125, 539, 320, 2368, EOT, 0],
        [SOT, 320, 1125, 539, 320, 2368, 269, EOT],  # lower-cased, whitespace collapsed, "." a token
        [SOT, 272, 273, 274, EOT, 0, 0, 0],  # digits one by one, as CLIP's split
    ]
    assert clip_bpe.size == 49408


def test_clip_bpe_truncates_keeping_the_end_token_in_the_graph(clip_bpe):
    ds = tf.data.Dataset.from_tensor_slices(["a photo of a cat on the grass"] * 4).batch(2)
    rows = [b for b in ds.map(lambda t: clip_bpe.batch(t, 5)).as_numpy_iterator()]
    assert [r.tolist() for r in rows] == [[[SOT, 320, 1125, 539, EOT]] * 2] * 2


def test_wordpiece_ids_and_recipe_choice(tmp_path):
    vocab = ["[PAD]", "[bos]", "[eos]", "[UNK]", "a", "photo", "of", "cat", "##s", "café", "cafe"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    wp = tokenizers.WordPiece(str(tmp_path / "vocab.txt"))
    ids = wp.batch(tf.constant(["A photo of cats", "Café dogs", ""]), 6).numpy().tolist()
    assert ids == [[4, 5, 6, 7, 8, 2], [10, 3, 2, 0, 0, 0], [2, 0, 0, 0, 0, 0]]  # accents stripped, [UNK], [eos]
    assert isinstance(tokenizers.from_recipe(text_recipe(tokenizer="clip_bpe", vocab_rows=49408)), tokenizers.ClipBpe)
    with pytest.raises(recipe.RecipeError, match=r"text\.vocab_rows = 32000 is less than the 49408 ids of clip_bpe"):
        tokenizers.from_recipe(text_recipe(tokenizer="clip_bpe"))
    with pytest.raises(recipe.RecipeError, match=r'text\.vocab = "nope\.txt" does not exist'):
        tokenizers.from_recipe(text_recipe(vocab="nope.txt"))


def openvision_vocab(path):
    """A vocab file of OpenVision's assets/bert_base_vocab_bos_eos.txt layout (BERT-base-uncased's, [unused0] and
    [unused1] renamed [bos] and [eos]; that file cannot be downloaded here): [PAD], [bos], [eos], [unused2-98],
    [UNK], [CLS], [SEP], [MASK], then word pieces."""
    reserved = ["[PAD]", "[bos]", "[eos]", *(f"[unused{i}]" for i in range(2, 99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    words = ["photo", "of", "the", "cat", "dog", "on", "grass", "cafe", "red", "##ing", "sit", "un", "##der"]
    vocab = [*reserved, *chars, *(f"##{c}" for c in chars), *words]
    path.write_text("\n".join(vocab) + "\n")
    return vocab


def openvision_row(vocab_file: str, text: str, max_len: int) -> list[int]:
    """OpenVision's encoder row, step by step as its src/transforms/bert_ops.py (my_bert_tokenize /
    my_eval_bert_tokenize with add_bos and add_eos) computes it: tensorflow-text's BertTokenizer, [bos] and [eos]
    around the pieces, padded or cut to max_len - 1 with the last slot forced to [eos] when cut, then [CLS]."""
    import tensorflow_text

    vocab = Path(vocab_file).read_text().split("\n")
    cls_token, bos, eos = vocab.index("[CLS]"), vocab.index("[bos]"), vocab.index("[eos]")
    tokenizer = tensorflow_text.BertTokenizer(vocab_file, token_out_type=tf.int32, lower_case=True)
    ids = tokenizer.tokenize(tf.constant([text])).merge_dims(1, -1)
    ids = tf.concat([tf.fill([1, 1], bos), ids, tf.fill([1, 1], eos)], axis=1)
    padded, mask = tensorflow_text.pad_model_inputs(ids, max_len - 1)
    if int(mask[0, -1]) == 1:
        padded = tf.concat([padded[:, :-1], tf.fill([1, 1], eos)], axis=1)
    return tf.concat([padded, tf.fill([1, 1], cls_token)], axis=1)[0].numpy().tolist()


def test_wordpiece_bos_eos_cls_rows_equal_openvisions_preprocessing(tmp_path):
    vocab = openvision_vocab(tmp_path / "vocab.txt")
    cls_id, a, photo, cat = (vocab.index(t) for t in ("[CLS]", "a", "photo", "cat"))
    texts = [
        "A photo of the cat",
        "Red dogs sitting UNDER the café!",  # case, accents, pieces, punctuation
        "a cat " * 20,  # cut: [eos] stays in the last slot before [CLS]
        "a cat on grass.",  # exactly fills max_len - 1 with [bos] and [eos]
        "naïve 42 — ümlaut",  # unknown pieces, digits, a dash outside the vocab
        "",
    ]
    wp = tokenizers.WordPiece(str(tmp_path / "vocab.txt"), row="bos_eos_cls")
    ours = wp.batch(tf.constant(texts), 8).numpy().tolist()
    assert ours == [openvision_row(str(tmp_path / "vocab.txt"), t, 8) for t in texts]
    assert all(row[-1] == cls_id and row[0] == tokenizers.BOS_ID for row in ours)
    assert ours[3][-2] == tokenizers.EOS_ID and 0 not in ours[3]  # the full row
    # the decoder's targets keep the plain row: word pieces, [eos], padding
    assert wp.captions(tf.constant(["a photo"]), 5).numpy().tolist() == [[a, photo, 2, 0, 0]]
    r = text_recipe(vocab=str(tmp_path / "vocab.txt"), row="bos_eos_cls")
    assert tokenizers.from_recipe(r).batch(tf.constant(["cat"]), 5).numpy().tolist() == [[1, cat, 2, 0, cls_id]]
    with pytest.raises(recipe.RecipeError, match=r'text\.row = "bos_eos_cls" is a WordPiece layout'):
        text_recipe(tokenizer="clip_bpe", vocab_rows=49408, row="bos_eos_cls")
    (tmp_path / "plain.txt").write_text("[PAD]\n[bos]\n[eos]\n[UNK]\ncat\n")
    with pytest.raises(
        recipe.RecipeError, match=r'text\.row = "bos_eos_cls" needs \[CLS\]: text\.vocab = ".*plain\.txt"'
    ):
        tokenizers.from_recipe(text_recipe(vocab=str(tmp_path / "plain.txt"), row="bos_eos_cls"))


def hugging_face_rows(vocab_file: str, texts: list[str], length: int, strip_sep: bool) -> list[list[int]]:
    """open_clip's HFTokenizer for bert-base-uncased (its configs' `hf_tokenizer_name`), step by step: Hugging Face's
    fast BERT tokenizer (the `tokenizers` pipeline transformers' BertTokenizerFast runs: BERT normaliser and
    pre-tokenizer, WordPiece, [CLS] ... [SEP]), cut and padded to `length`, then with strip_sep_token [SEP] -> 0."""
    from tokenizers import BertWordPieceTokenizer

    hf = BertWordPieceTokenizer(vocab_file, lowercase=True, clean_text=True, handle_chinese_chars=True)
    hf.enable_truncation(max_length=length)
    hf.enable_padding(length=length, pad_id=0)
    sep = hf.token_to_id("[SEP]")
    rows = [encoding.ids for encoding in hf.encode_batch(texts)]
    return [[0 if strip_sep and i == sep else i for i in row] for row in rows]


def test_wordpiece_cls_rows_equal_open_clips_hugging_face_tokenizer(tmp_path):
    vocab = openvision_vocab(tmp_path / "vocab.txt")
    texts = ["A photo of the cat", "Red dogs sitting UNDER the café!", "a cat " * 20, "naïve 42 — ümlaut", ""]
    for row, strip in (("cls_pad", True), ("cls_sep", False)):
        ours = tokenizers.WordPiece(str(tmp_path / "vocab.txt"), row=row).batch(tf.constant(texts), 8).numpy()
        assert ours.tolist() == hugging_face_rows(str(tmp_path / "vocab.txt"), texts, 8, strip)
        assert (ours[:, 0] == vocab.index("[CLS]")).all()
    (tmp_path / "plain.txt").write_text("[PAD]\n[bos]\n[eos]\n[UNK]\n[CLS]\ncat\n")
    with pytest.raises(recipe.RecipeError, match=r'text\.row = "cls_sep" needs \[SEP\]'):
        tokenizers.from_recipe(text_recipe(vocab=str(tmp_path / "plain.txt"), row="cls_sep"))


def text_recipe(**text):
    stage = {"name": "s", "resolution": 28, "global_batch": 8, "samples": 8, "peak_lr": 1e-3}
    return recipe.from_dict({"model": {"image": "Mu/7"}, "text": text, "stages": [stage]})


def draws(*rows):
    return jnp.array(rows, jnp.float32)


NEUTRAL = (0.5, 0.5, 0.5, 0.5)  # brightness +0, contrast x1, saturation x1, hue 0


def test_colour_jitter_off_and_neutral_draws_are_the_identity():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)), jnp.uint8)
    skipped = draws((0.0, 0.0, 1.0, 0.9, 0.95, 0.5), (1.0, 1.0, 0.0, 0.1, 0.81, 0.99))  # jitter? no (p 0.8), grey? no
    np.testing.assert_allclose(augment.colour_jitter(images, skipped, 0.4), images.astype(np.float32), atol=1e-4)
    neutral = draws((*NEUTRAL, 0.1, 0.5), (*NEUTRAL, 0.7, 0.9))
    np.testing.assert_allclose(augment.colour_jitter(images, neutral, 0.4), images.astype(np.float32), atol=1e-3)


def test_colour_jitter_brightness_grey_and_hue():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.integers(40, 200, (1, 6, 6, 3)), jnp.uint8)
    x = np.asarray(images, np.float32)
    brighter = augment.colour_jitter(images, draws((1.0, 0.5, 0.5, 0.5, 0.0, 0.9)), 0.1)
    np.testing.assert_allclose(brighter, np.clip(x + 0.8 * 0.1 * 255, 0, 255), atol=1e-3)  # + 0.8 s, in pixels
    grey = np.asarray(augment.colour_jitter(images, draws((0.5, 0.5, 0.5, 0.5, 0.9, 0.1)), 0.4))
    np.testing.assert_allclose(grey[..., 0], x @ augment.LUMA, atol=1e-3)
    assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 1], grey[..., 2])
    hue = np.asarray(augment.colour_jitter(images, draws((0.5, 0.5, 0.5, 1.0, 0.0, 0.9)), 0.4))
    np.testing.assert_allclose(hue @ augment.LUMA, x @ augment.LUMA, atol=1e-2)  # a chroma rotation keeps luma
    assert np.abs(hue - x).max() > 5  # ... and changes the colours
    contrast = np.asarray(augment.colour_jitter(images, draws((0.5, 0.0, 0.5, 0.5, 0.0, 0.9)), 0.5))
    mean_grey = (x @ augment.LUMA).mean()
    np.testing.assert_allclose(contrast, (x - mean_grey) * 0.6 + mean_grey, atol=1e-3)  # x (1 - 0.8 * 0.5)


@pytest.mark.parametrize("resolution", [224, 112, 84, 40])  # JPEG decoded at 1/2, 1/4, 1/8 and 1/8 scale
def test_jpeg_crops_decoded_at_a_smaller_scale_match_the_full_decode(resolution):
    import io

    from PIL import Image

    from trainer.data import preprocess

    coarse = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((960, 720), Image.BICUBIC))  # smooth, with structure
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    full = tf.io.decode_jpeg(out.getvalue(), channels=3)
    for sample in range(4):
        seed = tf.constant([3, sample], tf.int64)
        got = preprocess.train_image(tf.constant(out.getvalue()), resolution, seed, 0.4).numpy().astype(np.float32)
        begin, size = preprocess.crop_window(tf.shape(full), seed, 0.4)  # the same window, from the full decode
        ratio = max(r for r in (1, 2, 4, 8) if int(tf.reduce_min(size[:2])) // resolution >= r)
        assert ratio >= 2  # the scaled decode is what is checked
        (top, left), (height, width) = begin[:2] // ratio * ratio, size[:2] // ratio * ratio  # snapped to its pixels
        window = full[top : top + height, left : left + width]
        want = tf.image.resize(window, (resolution, resolution), antialias=True).numpy()
        assert np.abs(got - want).mean() < 3.0, (resolution, sample)  # a window off by one output pixel: ~8


def test_training_and_evaluation_resize_alike():
    # a model is evaluated on the interpolation it was trained on: a full-frame training crop of a square image is the
    # evaluation image, pixel for pixel; plain bilinear up to a 2x shrink, antialiased past it
    import io

    from PIL import Image

    from trainer.data import preprocess

    pixels = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    png = tf.constant(out.getvalue())
    trained = preprocess.train_image(png, 21, tf.constant([5, 6], tf.int64), 1.0).numpy()
    evaluated = preprocess.eval_image(preprocess.decode(png), 21).numpy()
    np.testing.assert_array_equal(trained, evaluated)
    plain = tf.image.resize(pixels, (21, 21)).numpy()
    np.testing.assert_array_equal(evaluated, (plain + 0.5).astype(np.uint8))
    smoothed = tf.image.resize(pixels, (21, 21), antialias=True).numpy()
    assert np.abs(evaluated - smoothed).mean() > 5  # the two filters differ on noise: the check above means something
    shrunk = preprocess.eval_image(preprocess.decode(png), 12).numpy()  # 28 -> 12: past 2x
    tent = tf.image.resize(pixels, (12, 12), antialias=True).numpy()
    np.testing.assert_array_equal(shrunk, (tent + 0.5).astype(np.uint8))


def test_a_random_sentence_of_the_recaption_as_openvision_cuts_it():
    from trainer.data.preprocess import random_sentence

    def draw(text, i):
        return random_sentence(tf.constant(text), tf.constant("alt"), tf.constant([7, i], tf.int64)).numpy().decode()

    drawn = [draw("A cat. It sits!! On a mat...", i) for i in range(60)]
    assert set(drawn) == {"A cat", " It sits", " On a mat"}  # every sentence, cut at runs of . and !
    assert drawn == [draw("A cat. It sits!! On a mat...", i) for i in range(60)]  # seeded: a resumed run draws alike
    assert draw("no full stop", 0) == "no full stop"
    assert draw("...", 0) == draw("", 0) == "alt"  # nothing left: the alt-text, as OpenVision
