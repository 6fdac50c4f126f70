"""Tokenizer ids against known values (CLIP's published BPE ids; a WordPiece vocab written here) and the device-side
colour jitter's maps on hand-checkable cases."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from trainer import augment, data, recipe
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


def openvision_jitter(image: np.ndarray, row: np.ndarray, strength: float) -> np.ndarray:
    """OpenVision's simclr_jitter_gray (src/transforms/ops_image.py -> simclr_aug.color_jitter_rand, impl simclrv2)
    written with the same tf.image ops, its random draws replaced by this row's: uint8 (H, W, 3) -> uint8."""
    import tensorflow as tf

    spread, low = 0.8 * strength, max(1 - 0.8 * strength, 0.0)
    factors = (
        low + row[0] * (1 + spread - low),  # tf.random_uniform([], max(1 - b, 0), 1 + b)
        1 - spread + row[1] * 2 * spread,  # random_contrast(lower=1 - c, upper=1 + c)
        1 - spread + row[2] * 2 * spread,  # random_saturation
        (2 * row[3] - 1) * 0.2 * strength,  # random_hue(max_delta=h)
    )
    ops = (
        lambda x: x * factors[0],
        lambda x: tf.image.adjust_contrast(x, factors[1]),
        lambda x: tf.image.adjust_saturation(x, factors[2]),
        lambda x: tf.image.adjust_hue(x, factors[3]),
    )
    x = tf.cast(image, tf.float32) / 255.0
    if row[4] < 0.8:  # random_apply(color_jitter, p=0.8)
        for op in np.argsort(row[6:10]):  # tf.random_shuffle(tf.range(4))
            x = tf.clip_by_value(ops[op](x), 0.0, 1.0)
    if row[5] < 0.2:  # random_apply(to_grayscale, p=0.2)
        x = tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])
    return tf.cast(tf.clip_by_value(x * 255, 0, 255), tf.uint8).numpy()


def test_colour_jitter_is_openvision_s_on_the_same_draws():
    """Every image of a batch against OpenVision's formulas (tf.image's ops in its order, clipped after each) on the
    same draws: equal to the pixel but where float rounding puts a value on the other side of a whole number."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 6, 7, 3)).astype(np.uint8)
    images[0] = 128  # a flat grey image: no hue, no saturation
    rows = rng.random((32, data.JITTER_DRAWS)).astype(np.float32)
    rows[:24, 4] = 0.5  # most of them jittered (p 0.8 otherwise), a few grey
    got = np.asarray(augment.colour_jitter(jnp.asarray(images), jnp.asarray(rows), 0.4))
    want = np.stack([openvision_jitter(image, row, 0.4) for image, row in zip(images, rows, strict=True)])
    assert got.dtype == np.float32 and np.all(got == np.floor(got))
    difference = np.abs(got - want.astype(np.float32))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02, (difference.max(), (difference > 0).mean())
    assert np.abs(got - images).max() > 20  # it did jitter


def test_colour_jitter_order_matters_and_skipped_draws_are_the_identity():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.integers(0, 256, (1, 5, 5, 3)), jnp.uint8)
    skipped = np.array([[0.0, 0.0, 1.0, 0.9, 0.95, 0.5, 0.1, 0.2, 0.3, 0.4]], np.float32)  # jitter? no, grey? no
    np.testing.assert_array_equal(augment.colour_jitter(images, jnp.asarray(skipped), 0.4), np.asarray(images))
    # brightness x1.32 then contrast x0.68, and the other way round: clipping in between tells them apart
    first, second = (np.array([[1.0, 0.0, 0.5, 0.5, 0.1, 0.9, *o]], np.float32) for o in ((0, 1, 2, 3), (1, 0, 2, 3)))
    a, b = (np.asarray(augment.colour_jitter(images, jnp.asarray(r), 0.5)) for r in (first, second))
    assert np.abs(a - b).max() >= 2
    for r, out in ((first, a), (second, b)):
        np.testing.assert_allclose(out, openvision_jitter(np.asarray(images[0]), r[0], 0.5)[None], atol=1)


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
