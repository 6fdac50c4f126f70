"""The tf.data input pipeline on real image files: formats, bad samples, order, host split, exact resume; the
WordPiece tokenizer; the prepare tools; zero-shot scoring on hand-checkable cases."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import data, recipe
from trainer.data import examples
from trainer.data.prepare import read_idx
from trainer.data.tfdata import BadDataError

VOCAB = ["[PAD]", "[bos]", "[eos]", "[UNK]", "a", "photo", "of", "cat", "##s", "dog", "red", "blue", "."]


def image_bytes(kind: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20 + seed % 7, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format={"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[kind])
    return out.getvalue()


def write_shards(directory: Path, *, corrupt: int = 0, empty: int = 0, truncate: bool = False) -> int:
    """4 shards x 25 samples (JPEG/PNG/WebP), the first `corrupt` images garbage and `empty` captions blank."""
    writer = examples.ShardWriter(directory, "train", 4)
    for i in range(100):
        img = b"not an image at all" if i < corrupt else image_bytes(("jpeg", "png", "webp")[i % 3], i)
        caption = "" if corrupt <= i < corrupt + empty else f"a photo of {('red', 'blue')[i % 2]} cats ."
        writer.write(examples.encode(img, {"txt": caption, "llava_caption": f"a dog {i}"}, key=f"s{i}"))
    writer.close()
    if truncate:
        shard = sorted(directory.glob("train-*.tfrecord"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return 100


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return tmp_path


def tiny_recipe(directory: Path, *overrides: str, train: str = "train-*.tfrecord") -> recipe.Recipe:
    root = Path(__file__).resolve().parents[1]
    settings = {
        "data.train": f"{directory}/{train}",
        "text.vocab": f"{directory}/vocab.txt",
        "text.context_length": "8",
        "text.caption_length": "6",
        "model.decoder": "Mu",  # the re-captions are read for a caption decoder only
        "data.shuffle_buffer": "30",
        "stages.0.global_batch": "8",
    }
    settings.update(item.split("=", 1) for item in overrides)
    return recipe.load(root / "recipes" / "tiny.toml", [f"{k}={v}" for k, v in settings.items()])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_have_the_stage_shapes_and_tokens(shards):
    write_shards(shards)
    r = tiny_recipe(shards)
    ((batch, position),) = take(data.open_stage(r, 0, data.Host()), 1)
    assert batch["images"].shape == (8, 21, 21, 3) and batch["images"].dtype == np.uint8
    assert batch["texts"].shape == (8, 8) and batch["captions"].shape == (8, 6)
    # "a photo of red|blue cats ." -> a photo of red|blue cat ##s . [eos], truncated to 8 with [eos] last
    expected = {(4, 5, 6, 10, 7, 8, 12, 2), (4, 5, 6, 11, 7, 8, 12, 2)}
    assert {tuple(row) for row in batch["texts"]} <= expected
    assert batch["captions"].tolist() == [[4, 9, 3, 2, 0, 0]] * 8  # "a dog <n>": <n> is [UNK], then [eos], padding
    assert position == {"epoch": 0, "consumed": 8, "seen": position["seen"], "bad": 0}
    # without a caption decoder the re-captions are neither parsed nor tokenized; the rest is the same batch
    ((alone, _),) = take(data.open_stage(tiny_recipe(shards, "model.decoder="), 0, data.Host()), 1)
    assert sorted(alone) == ["images", "texts"]
    for key in alone:
        np.testing.assert_array_equal(alone[key], batch[key])


def test_openvisions_rows_a_recaption_sentence_and_whole_decodes(shards):
    writer = examples.ShardWriter(shards, "train", 2)
    for i in range(20):
        recaption = "A red cat. A blue dog!" if i % 2 else ""  # none: the alt-text is the second text
        writer.write(examples.encode(image_bytes("jpeg", i), {"txt": "a photo", "llava_caption": recaption}))
    writer.close()
    (shards / "vocab.txt").write_text("\n".join([*VOCAB, "[CLS]"]) + "\n")
    cls_id = len(VOCAB)
    r = tiny_recipe(shards, "loss.contrast_recaption=true", "text.row=bos_eos_cls", "model.decoder=")
    ((batch, _), (later, _)) = take(data.open_stage(r, 0, data.Host()), 2)
    assert sorted(batch) == ["images", "recaption_texts", "texts"]  # no decoder: no whole re-captions
    assert batch["texts"].tolist() == [[1, 4, 5, 2, 0, 0, 0, cls_id]] * 8  # [bos] a photo [eos] ... [CLS]
    sentences = {(1, 4, 10, 7, 2, 0, 0, cls_id), (1, 4, 11, 9, 2, 0, 0, cls_id), (1, 4, 5, 2, 0, 0, 0, cls_id)}
    drawn = {tuple(row) for b in (batch, later) for row in b["recaption_texts"]}
    assert drawn == sentences  # either sentence of the re-caption, or the alt-text where there is none
    # OpenVision's image input: whole decodes and always-antialiased resizes give other (still uint8) crops
    exact = tiny_recipe(shards, "loss.contrast_recaption=true", "data.scaled_decode=false", "data.antialias=always")
    ((whole, _),) = take(data.open_stage(exact, 0, data.Host()), 1)
    assert whole["images"].shape == batch["images"].shape and not np.array_equal(whole["images"], batch["images"])


def test_order_is_seeded_and_resume_is_exact(shards):
    write_shards(shards)
    r = tiny_recipe(shards)
    first = take(data.open_stage(r, 0, data.Host()), 20)  # 160 samples: past the end of the 100-sample epoch
    again = take(data.open_stage(r, 0, data.Host()), 20)
    for (a, pa), (b, pb) in zip(first, again, strict=True):
        assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)
    assert [p["epoch"] for _, p in first[11:13]] == [0, 1]  # batch 12 holds epoch 0's last 4 rows and epoch 1's first
    for cut in (3, 12, 13):  # mid-epoch, before the batch that spans the epochs' boundary, after it
        resumed = take(data.open_stage(r, 0, data.Host(), first[cut - 1][1]), 5)
        for (a, pa), (b, pb) in zip(first[cut : cut + 5], resumed, strict=True):
            assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)
    other_seed = take(data.open_stage(tiny_recipe(shards, "data.seed=1"), 0, data.Host()), 1)
    assert not np.array_equal(other_seed[0][0]["images"], first[0][0]["images"])


def test_a_resume_reads_no_shard_window_before_its_own(shards):
    """With every shard's count known (the index), a resume starts at the window of shards holding its next record:
    the earlier windows' shards are never opened, so it takes the same time wherever in the epoch it stops. Shown by
    replacing them with garbage after the position was taken: the resumed batches do not change (replacing a shard of
    the resume's own window does change them)."""
    from trainer.data import tfdata

    write_shards(shards)  # 4 shards x 25 records, with the index
    for seed in range(10):  # a seed whose first two windows leave out the first shard (a start probes its records)
        r = tiny_recipe(shards, "data.shard_window=1", f"data.seed={seed}")
        part = tfdata.open_parts(r, data.Host())[0]
        order = [part.files[i] for i in tfdata.shard_order(part, 0).numpy()]
        if part.files[0] not in order[:3]:
            break
    straight = take(data.open_stage(r, 0, data.Host()), 11)
    position = straight[7][1]  # 64 records consumed: the third window (records 50-74)
    assert position["epoch"] == 0 and position["consumed"] == 64
    for done in order[:2]:
        Path(done).write_bytes(b"garbage " * 100)
    resumed = take(data.open_stage(r, 0, data.Host(), position), 3)
    for (a, pa), (b, pb) in zip(straight[8:11], resumed, strict=True):
        assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)
    Path(order[2]).write_bytes(b"garbage " * 100)
    broken = take(data.open_stage(r, 0, data.Host(), position), 1)[0][0]
    assert not np.array_equal(broken["images"], straight[8][0]["images"])


def test_epochs_follow_each_other_without_losing_rows(shards):
    write_shards(shards)
    r = tiny_recipe(shards, "data.crop_min_area=1.0")  # whole images: a sample's rows are equal in every epoch
    two_epochs = take(data.open_stage(r, 0, data.Host()), 25)  # 25 x 8 = 200 rows = 2 x 100 samples
    seen = [b["images"][i].tobytes() for b, _ in two_epochs for i in range(8)]
    assert len(set(seen[:100])) == 100 and sorted(seen[:100]) == sorted(seen[100:])  # each sample once per epoch
    assert seen[:100] != seen[100:]  # in another order
    assert two_epochs[-1][1] == {"epoch": 1, "consumed": 100, "seen": 200, "bad": 0}


def test_unusable_shards_are_refused_up_front(shards):
    write_shards(shards)
    with pytest.raises(
        BadDataError,
        match=r"first 32 of .*train-00000-of-00004.tfrecord: the caption under "
        r'data.caption_key = "alt" is empty \(keys: \[.image., .key., .llava_caption., .txt.\]\)',
    ):
        take(data.open_stage(tiny_recipe(shards, "data.caption_key=alt"), 0, data.Host()), 1)
    write_shards(shards, corrupt=100)
    with pytest.raises(BadDataError, match=r"train-00000-of-00004.tfrecord: the image does not decode"):
        take(data.open_stage(tiny_recipe(shards), 0, data.Host()), 1)
    (shards / "wds").mkdir()
    with tarfile.open(shards / "wds" / "00000.tar", "w") as tar:  # images without their .txt alt-text
        for i in range(3):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = len(payload := image_bytes("jpeg", i))
            tar.addfile(info, io.BytesIO(payload))
    wds = tiny_recipe(shards, "data.source=webdataset", train="wds/*.tar")
    with pytest.raises(BadDataError, match=r"first 32 of .*00000.tar: the samples' .txt members .* are empty"):
        take(data.open_stage(wds, 0, data.Host()), 1)


def test_hosts_read_disjoint_shares(shards):
    write_shards(shards)
    r = tiny_recipe(shards, "data.crop_min_area=1.0")
    keys = []
    for index in range(2):
        batches = take(data.open_stage(r, 0, data.Host(index, 2)), 12)  # 12 x 4 rows: all 50 of its 2 shards
        assert all(b["images"].shape[0] == 4 for b, _ in batches)
        keys.append({b["images"][i].tobytes() for b, _ in batches for i in range(4)})
    assert len(keys[0]) == len(keys[1]) == 48 and not keys[0] & keys[1]


def test_bad_samples_are_skipped_and_counted(shards):
    write_shards(shards, corrupt=3, empty=2, truncate=True)
    from trainer.data.tfsetup import tf

    truncated = sorted(str(p) for p in shards.glob("train-*.tfrecord"))[-1]
    lost = 25 - sum(1 for _ in tf.data.TFRecordDataset(truncated).ignore_errors())
    assert 1 <= lost <= 24
    r = tiny_recipe(shards, "data.max_bad_fraction=0.5")
    stream = data.open_stage(r, 0, data.Host())
    batches = [next(stream)]
    while batches[-1][1]["epoch"] == 0:
        batches.append(next(stream))
    for batch, _ in batches:
        assert batch["images"].shape[0] == 8 and (batch["texts"][:, 0] == 4).all()  # only good rows
    # epoch 0 = 100 records, of which 3 undecodable, 2 with empty captions and `lost` never read from the truncated
    # shard: its 100 - 5 - lost good rows, then the first batch that reaches into epoch 1
    assert len(batches) == (100 - 5 - lost) // 8 + 1
    _, position = batches[-1]
    assert position["seen"] == 100 + position["consumed"]
    assert 5 + lost <= position["bad"] <= 5 + lost + 5  # + the bad ones of epoch 1 consumed so far


def test_too_many_bad_samples_stop_with_the_shard_named(shards):
    write_shards(shards, corrupt=40)
    r = tiny_recipe(shards, "data.max_bad_fraction=0.1")
    with pytest.raises(BadDataError, match=r"more than data.max_bad_fraction = 0.1; the latest in .*train-0000\d-of"):
        take(data.open_stage(r, 0, data.Host()), 12)


def test_recipe_mistakes_about_data_are_one_line(shards):
    write_shards(shards)
    with pytest.raises(recipe.RecipeError, match=r'data.train = ".*/nothing-\*" matches no files'):
        next(data.open_stage(tiny_recipe(shards, train="nothing-*"), 0, data.Host()))
    with pytest.raises(recipe.RecipeError, match=r"text\.vocab_rows = 4 is less than the 13 ids of bert_wordpiece"):
        next(data.open_stage(tiny_recipe(shards, "text.vocab_rows=4"), 0, data.Host()))


def test_prepare_folder_from_tsv_and_jsonl(tmp_path):
    from click.testing import CliRunner

    from trainer.data.prepare import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.png").write_bytes(image_bytes("png", i))
    (tmp_path / "c.tsv").write_text("".join(f"{i}.png\tcaption {i}\trecaption {i}\n" for i in range(6)))
    out = CliRunner().invoke(main, ["folder", str(images), str(tmp_path / "c.tsv"), str(tmp_path / "tsv")])
    assert out.exit_code == 0, out.output
    assert "train: 5 samples" in out.output and "(1 missing files)" in out.output
    assert sum(json.loads((tmp_path / "tsv" / "index.json").read_text()).values()) == 5
    lines = [json.dumps({"file": f"{i}.png", "caption": f"c {i}", "label": i}) for i in range(5)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    out = CliRunner().invoke(
        main, ["folder", str(images), str(tmp_path / "c.jsonl"), str(tmp_path / "j"), "--prefix", "val"]
    )
    assert out.exit_code == 0, out.output
    from trainer.data.tfsetup import tf

    parsed = [
        examples.parse(r, ("txt",), with_label=True)
        for r in tf.data.TFRecordDataset(sorted(str(p) for p in (tmp_path / "j").glob("val-*.tfrecord")))
    ]
    assert sorted(int(p["label"]) for p in parsed) == [0, 1, 2, 3, 4]
    (tmp_path / "bad.tsv").write_text("0.png\n")
    out = CliRunner().invoke(main, ["folder", str(images), str(tmp_path / "bad.tsv"), str(tmp_path / "x")])
    assert out.exit_code == 2 and "bad.tsv:1: expected file<TAB>caption" in out.output


def test_idx_reader(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    (tmp_path / "x.idx").write_bytes(header + bytes(range(12)))
    assert read_idx(tmp_path / "x.idx").tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_zero_shot_hits_on_a_hand_checkable_case():
    from trainer.evals.zeroshot import hits

    classes = np.eye(6, dtype=np.float32)  # class c = axis c
    images = np.array(
        [[1, 0, 0, 0, 0, 0], [0.1, 0.9, 0, 0, 0, 0], [0, 0.2, 0.1, 0.9, 0.3, 0.4], [0, 0, 0, 0, 0, 1]], np.float32
    )
    labels = np.array([0, 0, 2, -1])  # right; second-best (top-5 only); 5th of 6 (top-5 only); padding
    top1, top5, seen = np.asarray(hits(images, classes, labels))
    assert (top1, top5, seen) == (1, 3, 3)


def write_tars(directory: Path) -> None:
    """2 tars x 10 samples as img2dataset writes them; sample 3's image is garbage; the second tar is cut short."""

    directory.mkdir(parents=True, exist_ok=True)
    for t in range(2):
        path = directory / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(10):
                key = f"{t:05d}{i:04d}"
                members = {
                    f"{key}.jpg": b"garbage" if (t, i) == (0, 3) else image_bytes("jpeg", 10 * t + i),
                    f"{key}.txt": f"a photo of {('red', 'blue')[i % 2]} cats .".encode(),
                    f"{key}.json": json.dumps({"key": key, "llava_caption": "a dog"}).encode(),
                }
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        if t == 1:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_webdataset_tars_are_read_directly_and_resume_exactly(shards):
    write_tars(shards / "wds")
    r = tiny_recipe(shards, "data.source=webdataset", "stages.0.global_batch=4", train="wds/*.tar")
    first = take(data.open_stage(r, 0, data.Host()), 6)
    assert all(b["images"].shape == (4, 21, 21, 3) for b, _ in first)
    assert {tuple(row[:4]) for b, _ in first for row in b["texts"]} <= {(4, 5, 6, 10), (4, 5, 6, 11)}
    assert all(b["captions"][0].tolist() == [4, 9, 2, 0, 0, 0] for b, _ in first)  # the re-caption from the JSON
    epoch0 = [p for _, p in first if p["epoch"] == 0]
    assert epoch0[-1]["bad"] == 1  # the garbage image; the cut tar just ends (no index to count against)
    resumed = take(data.open_stage(r, 0, data.Host(), first[2][1]), 3)
    for (a, pa), (b, pb) in zip(first[3:6], resumed, strict=True):
        assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)


def test_prepare_webdataset_to_tfrecord(tmp_path):
    from click.testing import CliRunner

    from trainer.data.prepare import main

    write_tars(tmp_path / "wds")
    out = CliRunner().invoke(main, ["webdataset", f"{tmp_path}/wds/*.tar", str(tmp_path / "tf"), "--shards", "2"])
    assert out.exit_code == 0, out.output
    count = int(out.output.split("train: ")[1].split()[0])
    assert 10 < count < 20 and "from 2 tars" in out.output  # all of the first tar, part of the cut one
    assert sum(json.loads((tmp_path / "tf" / "index.json").read_text()).values()) == count


def test_recall_at_k_on_a_hand_checkable_case():
    from trainer.evals.retrieval import recall_at_k

    # 3 images, 4 captions: captions 0, 1 belong to image 0; caption 2 to image 1; caption 3 to image 2
    owner = np.array([0, 0, 1, 2])
    sim = np.array(
        [
            [0.1, 0.9, 0.2, 0.0],  # image 0: best caption 1 (its own) -> i2t hit at 1
            [0.8, 0.1, 0.7, 0.0],  # image 1: best caption 0 (not its own), then 2 (its own) -> hit at 2
            [0.0, 0.0, 0.1, 0.05],  # image 2: caption 2, then 3 (its own) -> hit at 2
        ]
    )
    got = recall_at_k(sim, owner, ks=(1, 2))
    assert got["i2t_r@1"] == pytest.approx(1 / 3) and got["i2t_r@2"] == 1.0
    # t2i: caption 0 -> image 1 first (miss@1), image 0 second; caption 1 -> image 0; caption 2 -> image 1 (0.7 > 0.2)
    # ; caption 3 -> image 2 (0.05 > 0.0)
    assert got["t2i_r@1"] == pytest.approx(3 / 4) and got["t2i_r@2"] == 1.0


def test_prepare_tuxpaint_holds_stamps_out_for_retrieval(tmp_path):
    from click.testing import CliRunner

    from trainer.data.prepare import main
    from trainer.data.tfsetup import tf
    from trainer.evals.retrieval import read_karpathy

    stamps = tmp_path / "stamps"
    for i in range(12):  # Tux Paint's layout: category folders of NAME.png (RGBA) + NAME.txt (English first)
        folder = stamps / ("animals" if i % 2 else "food")
        folder.mkdir(parents=True, exist_ok=True)
        rgba = np.zeros((10, 12, 4), np.uint8)
        rgba[2:8, 3:9] = (200, 30, 30, 255)  # an opaque red square; the rest transparent
        Image.fromarray(rgba, "RGBA").save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(f"A red thing number {i}.\nfr.utf8=Une chose rouge {i}.\n")
    (stamps / "food" / "uncaptioned.png").write_bytes((stamps / "food" / "s0.png").read_bytes())
    out = CliRunner().invoke(main, ["tuxpaint", str(stamps), str(tmp_path / "tux"), "--heldout", "4"])
    assert out.exit_code == 0, out.output
    assert "train: 8 samples" in out.output and "held out: 4 images" in out.output
    images, captions, owner = read_karpathy(str(tmp_path / "tux" / "karpathy.json"), "evals.0")
    assert len(images) == 4 and owner.tolist() == [0, 1, 2, 3]
    assert all(c.startswith("A red thing number ") for c in captions)  # the English line only
    held = {int(c.split()[-1].rstrip(".")) for c in captions}
    trained = {
        int(examples.parse(r, ("txt",))["txt"].numpy().decode().split()[-1].rstrip("."))
        for r in tf.data.TFRecordDataset(sorted(str(p) for p in (tmp_path / "tux").glob("train-*.tfrecord")))
    }
    assert not held & trained and held | trained == set(range(12))
    pixels = np.asarray(Image.open(images[0]).convert("RGB"), np.int16)
    assert abs(pixels[0, 0] - 255).max() <= 3 and abs(pixels[5, 5] - (200, 30, 30)).max() <= 12  # over white
    too_many = CliRunner().invoke(main, ["tuxpaint", str(stamps), str(tmp_path / "x"), "--heldout", "12"])
    assert too_many.exit_code == 2 and "has 12 captioned PNG stamps, not more than --heldout 12" in too_many.output


def write_idx(path: Path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_prepare_fashion_mnist_from_idx_files(tmp_path):
    from click.testing import CliRunner

    from trainer.data.prepare import FASHION_CLASSES, FASHION_VERSION, main
    from trainer.data.tfsetup import tf

    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    for images, labels, count in (("train-images", "train-labels", 30), ("t10k-images", "t10k-labels", 12)):
        write_idx(src / f"{images}-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(src / f"{labels}-idx1-ubyte.gz", np.arange(count) % 10)
    out = CliRunner().invoke(main, ["fashion-mnist", str(src), str(tmp_path / "fm"), "--vocab-size", "80"])
    assert out.exit_code == 0, out.output
    fm = tmp_path / "fm"
    assert json.loads((fm / "index.json").read_text()).keys() >= {"train-00000-of-00008.tfrecord"}
    train = [
        examples.parse(r, ("txt", "llava_caption"))
        for r in tf.data.TFRecordDataset(sorted(map(str, fm.glob("train-*"))))
    ]
    test = [
        examples.parse(r, (), with_label=True) for r in tf.data.TFRecordDataset(sorted(map(str, fm.glob("test-*"))))
    ]
    assert len(train) == 30 and sorted(int(t["label"]) for t in test) == sorted(np.arange(12) % 10)
    for ex in train:  # every caption names the class of its image
        assert sum(name in ex["txt"].numpy().decode() for name in FASHION_CLASSES) >= 1
        assert ex["llava_caption"].numpy().decode().startswith("a grayscale product photo of a ")
    assert (fm / "classnames.txt").read_text().split("\n")[:2] == ["t-shirt", "trouser"]
    assert "{}" in (fm / "templates.txt").read_text() and (fm / "vocab.txt").read_text().startswith("[PAD]\n[bos]\n")
    assert json.loads((fm / "prepared.json").read_text()) == {"fashion-mnist": FASHION_VERSION}
    assert f'"fashion-mnist": {FASHION_VERSION}' in (Path(__file__).parents[1] / ".ci" / "demo").read_text()
    missing = CliRunner().invoke(main, ["fashion-mnist", str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert missing.exit_code == 2 and "apt install dataset-fashion-mnist" in missing.output


def test_prefetched_batches_keep_order_raise_the_sources_error_and_stop_on_close():
    from trainer.data.prefetch import Prefetched

    def failing():
        for i in range(3):
            yield i, {"consumed": i}
        raise BadDataError("data: 9 of 10 samples were bad")

    batches = Prefetched(failing(), lambda b: b * 10)
    assert [next(batches) for _ in range(3)] == [(0, {"consumed": 0}), (10, {"consumed": 1}), (20, {"consumed": 2})]
    with pytest.raises(BadDataError, match="9 of 10"):  # in the loop's thread, after the good batches
        next(batches)
    batches.close()

    with Prefetched(iter([(1, {}), (2, {})]), lambda b: b) as finite:
        assert list(finite) == [(1, {}), (2, {})]
        assert list(finite) == []  # stays ended

    def endless():
        i = 0
        while True:
            i += 1
            yield i, {}

    with Prefetched(endless(), lambda b: b, size=2) as ahead:
        assert next(ahead) == (1, {})
        thread = ahead._thread
    assert not thread.is_alive()  # leaving the block stopped it, though the source never ends
