"""OpenVision's data formats on real parts: TFDS builder directories (written by tensorflow-datasets itself from
Fashion-MNIST's real images, under OpenVision's feature names), weighted mixtures that resume exactly, the eval
preparation commands (ImageNet validation layouts, COCO / Flickr30k Karpathy splits) and webdataset eval shards with
`.cls` labels, read by the real pipeline, evaluators and trainer."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from standins import warm

from trainer import data, recipe
from trainer.data.prepare import FASHION_CLASSES, FASHION_HOME, main, read_idx
from trainer.data.tfdata import BadDataError
from trainer.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SOURCE_WORDS = ("alpha", "beta")  # each training source's captions start with its own word: rows tell their source
VOCAB = ["[PAD]", "[bos]", "[eos]", "[UNK]", *SOURCE_WORDS, "a", "photo", "of", *FASHION_CLASSES, "re", "caption"]
# skipped only off CI: .ci/setup installs it, so under CI a missing file fails the tests instead of hiding them
NEEDS_FASHION = pytest.mark.skipif(
    not Path(FASHION_HOME, "t10k-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
    reason="apt install dataset-fashion-mnist",
)
pytestmark = NEEDS_FASHION


@pytest.fixture(scope="session")  # not module: CI's two xdist workers interleave the modules' tests
def fashion() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's real test images (28x28 grey) and labels, as RGB."""
    images = read_idx(Path(FASHION_HOME, "t10k-images-idx3-ubyte.gz"))[:400]
    labels = read_idx(Path(FASHION_HOME, "t10k-labels-idx1-ubyte.gz"))[:400]
    return np.repeat(images[..., None], 3, axis=-1), labels.astype(np.int64)


def jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def caption(word: str, label: int) -> str:
    return f"{word} a photo of a {FASHION_CLASSES[label]}"


def make_tfds(root: Path, name: str, word: str, fashion, rows: range, shards: int = 3) -> Path:
    """A TFDS builder directory written by tensorflow-datasets, with OpenVision's features: `jpg` (JPEG), `txt`
    (the alt-text), `llava_caption` (the re-caption); splits train (`rows`) and validation (10 more)."""
    import tensorflow_datasets as tfds

    images, labels = fashion
    features = tfds.features.FeaturesDict(
        {
            "jpg": tfds.features.Image(encoding_format="jpeg"),
            "txt": tfds.features.Text(),
            "llava_caption": tfds.features.Text(),
        }
    )

    def split(indices):
        return [
            (str(i), {"jpg": images[i], "txt": caption(word, labels[i]), "llava_caption": "re caption"})
            for i in indices
        ]

    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version="1.0.0",
        features=features,
        split_datasets={"train": split(rows), "validation": split(range(rows.stop, rows.stop + 10))},
        data_dir=str(root),
        download_config=tfds.download.DownloadConfig(num_shards=shards),
    )
    return Path(builder.data_dir)


def write_tars(directory: Path, fashion, rows: range, word: str, per_tar: int = 20, cls: bool = False) -> None:
    """img2dataset / CLIP_benchmark webdataset shards of real images: KEY.jpg + KEY.txt (+ KEY.cls)."""
    images, labels = fashion
    directory.mkdir(parents=True, exist_ok=True)
    indices = list(rows)
    for t in range(0, len(indices), per_tar):
        with tarfile.open(directory / f"{t // per_tar:05d}.tar", "w") as tar:
            for i in indices[t : t + per_tar]:
                members = {f"s{i:07d}.jpg": jpeg(images[i]), f"s{i:07d}.txt": caption(word, labels[i]).encode()}
                if cls:
                    members[f"s{i:07d}.cls"] = str(int(labels[i])).encode()
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="session")  # not module: CI's two xdist workers interleave the modules' tests
def sets(tmp_path_factory, fashion) -> Path:
    """Two TFDS builders (alpha: 120 train rows, beta: 60) and beta's rows again as webdataset tars."""
    root = tmp_path_factory.mktemp("sets")
    make_tfds(root / "tfds", "alpha", "alpha", fashion, range(0, 120))
    make_tfds(root / "tfds", "beta", "beta", fashion, range(200, 260), shards=2)
    write_tars(root / "wds", fashion, range(200, 260), "beta")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


def tiny(sets: Path, *overrides: str) -> recipe.Recipe:
    settings = {
        "text.vocab": f"{sets}/vocab.txt",
        "text.vocab_rows": "64",
        "text.context_length": "10",
        "text.caption_length": "6",
        "data.shuffle_buffer": "50",
        "data.crop_min_area": "1.0",
        "stages.0.global_batch": "8",
    }
    settings.update(item.split("=", 1) for item in overrides)
    return recipe.load(ROOT / "recipes" / "tiny.toml", [f"{k}={v}" for k, v in settings.items()])


def tfds_recipe(sets: Path, *overrides: str) -> recipe.Recipe:
    builder = sets / "tfds" / "alpha" / "1.0.0"
    return tiny(sets, "data.source=tfds", f"data.train={builder}", "data.image_key=jpg", *overrides)


MIX_SETTINGS = {
    "text.vocab_rows": "64",
    "text.context_length": "10",
    "data.shuffle_buffer": "50",
    "data.crop_min_area": "1.0",
    "stages.0.global_batch": "8",
}


def mixture_file(sets: Path, raw_extra: str = "", weights: tuple[float, float] = (3.0, 1.0)) -> Path:
    """tiny.toml with alpha (TFDS) and beta (webdataset tars) mixed 3:1 (and `raw_extra` appended)."""
    text = (
        (ROOT / "recipes" / "tiny.toml")
        .read_text()
        .replace(
            'source = "tfrecord"\ntrain = "data/fashion-mnist/train-*.tfrecord"', 'source = "tfds"\nimage_key = "jpg"'
        )
    )
    text = text.replace('vocab = "data/fashion-mnist/vocab.txt"', f'vocab = "{sets}/vocab.txt"')
    text += (
        f'\n[[data.mixture]]\ntrain = "{sets}/tfds/alpha/1.0.0"\nweight = {weights[0]}\n'
        f'\n[[data.mixture]]\nsource = "webdataset"\ntrain = "{sets}/wds/*.tar"\nweight = {weights[1]}\n{raw_extra}'
    )
    path = sets / f"mixture-{hashlib.sha1(text.encode()).hexdigest()[:12]}.toml"
    path.write_text(text)
    return path


def mixture(sets: Path, raw_extra: str = "", weights: tuple[float, float] = (3.0, 1.0)) -> recipe.Recipe:
    path = mixture_file(sets, raw_extra, weights)
    return recipe.load(path, [f"{k}={v}" for k, v in MIX_SETTINGS.items()])


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def same(a, b) -> None:
    for (x, px), (y, py) in zip(a, b, strict=True):
        assert px == py and sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)


def first_words(batches) -> list[int]:
    """Each row's source (0 = alpha, 1 = beta), by its caption's first token."""
    ids = [int(row[0]) for b, _ in batches for row in b["texts"]]
    assert set(ids) <= {4, 5}
    return [i - 4 for i in ids]


# --- TFDS builder directories ------------------------------------------------------------------------------------


def test_a_tfds_builder_is_read_with_its_keys_and_resumes_exactly(sets):
    from trainer.data import sources

    r = tfds_recipe(sets, "model.decoder=Mu")
    files, counts = sources.shards(r.data.sources()[0])
    assert [Path(f).name for f in files] == [f"alpha-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    assert sum(counts.values()) == 120  # the split's shard lengths: a truncated shard would be counted
    first = take(data.open_stage(r, 0, data.Host()), 18)  # 144 rows: past the end of the 120-row epoch
    batch, position = first[0]
    assert batch["images"].shape == (8, 21, 21, 3) and batch["texts"].shape == (8, 10)
    assert (batch["texts"][:, :4] == [4, 6, 7, 8]).all()  # "alpha a photo of ..." from `txt`
    assert (batch["captions"][:, :3] == [19, 20, 2]).all()  # "re caption" [eos] from `llava_caption`
    assert position == {"epoch": 0, "consumed": 8, "seen": 8, "bad": 0}
    assert first[-1][1] == {"epoch": 1, "consumed": 24, "seen": 144, "bad": 0}
    for cut in (4, 15):  # mid-epoch; at the batch that spans the epochs' boundary
        same(first[cut : cut + 3], take(data.open_stage(r, 0, data.Host(), first[cut - 1][1]), 3))
    # the validation split (10 rows) and two hosts: each reads its share of the split's shards
    val = tfds_recipe(sets, "data.split=validation", "stages.0.global_batch=2")
    assert sum(sources.shards(val.data.sources()[0])[1].values()) == 10
    both = tfds_recipe(sets, "data.split=train+validation")
    assert sum(sources.shards(both.data.sources()[0])[1].values()) == 130
    shares = [take(data.open_stage(r, 0, data.Host(i, 2)), 10) for i in range(2)]  # 40 rows each of 40 / 80
    seen = [{b["images"][i].tobytes() for b, _ in share for i in range(4)} for share in shares]
    assert len(seen[0]) == len(seen[1]) == 40 and not seen[0] & seen[1]


def test_a_tfds_source_is_opened_on_the_caller_s_thread_and_only_read_on_the_prefetch_thread(sets):
    # TensorFlow Datasets' imports swap Python's import function for the whole process while they run (etils'
    # lazy_imports): a JAX import on another thread meanwhile (lax.scan imports inside itself) failed the trainer's
    # init, once, in CI. So every TFDS import happens where the stage is opened, never on the thread that reads it.
    import builtins
    import threading

    from trainer.data.prefetch import Prefetched

    original, on_prefetch = builtins.__import__, []

    def recording(name, *args, **kwargs):
        if threading.current_thread().name == "prefetch":
            on_prefetch.append(name)
        return original(name, *args, **kwargs)

    stream = data.open_stage(tfds_recipe(sets), 0, data.Host())
    builtins.__import__ = recording
    try:
        with Prefetched(stream, lambda batch: batch) as batches:
            assert next(batches)[0]["images"].shape == (8, 21, 21, 3)
    finally:
        builtins.__import__ = original
    assert not [name for name in on_prefetch if name.startswith(("tensorflow_datasets", "etils"))], on_prefetch


def test_tfds_mistakes_are_one_line_naming_what_exists(sets):
    from trainer import preflight

    builder = sets / "tfds" / "alpha" / "1.0.0"
    cases = [
        (
            tfds_recipe(sets, "data.split=test"),
            rf'data.split = "test": {builder} has no split "test" \(its splits: train, validation\)',
        ),
        (
            tfds_recipe(sets, f"data.train={sets}/tfds/alpha"),
            rf'data.train = "{sets}/tfds/alpha" is not a TFDS builder directory \(it has no dataset_info.json\): did'
            rf" you mean {builder}\?",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(RecipeError, match=message):
            preflight.check_paths(bad, sets / "workdir")  # before anything heavy
        with pytest.raises(RecipeError, match=message):
            next(data.open_stage(bad, 0, data.Host()))
    with pytest.raises(
        BadDataError,
        match=r"alpha-train.tfrecord-00000-of-00003: it has no image under data.image_key = \"image\" \(keys: \['jpg',"
        r" 'llava_caption', 'txt'\]\)",
    ):
        next(data.open_stage(tfds_recipe(sets, "data.image_key=image"), 0, data.Host()))
    with pytest.raises(BadDataError, match=r'the caption under data.caption_key = "caption" is empty \(keys: \[.jpg.'):
        next(data.open_stage(tfds_recipe(sets, "data.caption_key=caption"), 0, data.Host()))
    with pytest.raises(RecipeError, match=r'data.split = "train\[:10%\]" must name whole TFDS splits'):
        tfds_recipe(sets, "data.split='train[:10%]'")
    with pytest.raises(RecipeError, match=r"must be one TFDS builder directory .* not a list or a glob"):
        tfds_recipe(sets, f"data.train={sets}/tfds/*/1.0.0")


# --- weighted mixtures -------------------------------------------------------------------------------------------


def test_a_mixture_draws_by_its_weights_and_resumes_exactly(sets):
    r = mixture(sets)
    assert [(s.source, s.image_key, s.weight) for s in r.data.sources()] == [
        ("tfds", "jpg", 3.0),
        ("webdataset", "jpg", 1.0),
    ]
    first = take(data.open_stage(r, 0, data.Host()), 60)  # 480 rows: alpha's 120-row epoch ~3 times, beta's 60 ~2
    drawn = first_words(first)
    share = sum(drawn) / len(drawn)  # beta's: 1/4 expected, binomial sd 0.020 over 480 draws
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(drawn)), share
    _, position = first[-1]
    assert position["draws"] == 480 and position["bad"] == 0
    for per_epoch, rows, state in zip((120, 60), (480 - sum(drawn), sum(drawn)), position["sources"], strict=True):
        assert state["epoch"] * per_epoch + state["consumed"] == state["seen"] == rows  # each source's own position
    for cut in (1, 7, 31):  # a resumed stream is the uninterrupted one: same rows, same positions
        same(first[cut : cut + 4], take(data.open_stage(r, 0, data.Host(), first[cut - 1][1]), 4))
    # other weights, other proportions (9:1) from the same sources
    heavy = first_words(take(data.open_stage(mixture(sets, weights=(9.0, 1.0)), 0, data.Host()), 30))
    assert abs(sum(heavy) / len(heavy) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(heavy))
    with pytest.raises(RecipeError, match="the checkpoint's data position is of one source, the recipe has a data"):
        next(data.open_stage(r, 0, data.Host(), {"epoch": 0, "consumed": 8, "seen": 8, "bad": 0}))


def test_mixture_mistakes_are_one_line_naming_the_key(sets):
    cases = [
        ("weight = -1.0", r"data.mixture\[2\].weight = -1.0 must be more than 0"),
        ("weight = 0", r"data.mixture\[2\].weight = 0.0 must be more than 0"),
        ("weights = 2", r"unknown key data.mixture\[2\].weights \(known here: train, weight, source"),
        ('source = "synthetic"', r'data.mixture\[2\].source = "synthetic" is not one of "", "tfrecord"'),
        ('split = "all[:5]"', r'data.mixture\[2\].split = "all\[:5\]" must name whole TFDS splits'),
        ('caption_key = "txt"\ntrain = ""', r"data.mixture\[2\].train is empty"),
    ]
    for extra, message in cases:
        raw = f'\n[[data.mixture]]\ntrain = "{sets}/tfds/beta/1.0.0"\n{extra}\n'
        if 'train = ""' in extra:
            raw = f"\n[[data.mixture]]\n{extra}\n"
        with pytest.raises(RecipeError, match=message):
            mixture(sets, raw)
    with pytest.raises(RecipeError, match=r'data.train = "x" is set as well as \[\[data.mixture\]\]'):
        recipe.load(mixture_file(sets), ["data.train=x"])
    with pytest.raises(RecipeError, match=r'data.source = "synthetic" cannot be mixed: set data.mixture\[0\].source'):
        recipe.load(mixture_file(sets), ["data.source=synthetic"])
    # a mixture entry's wrong key is named as the entry's when it set it, as [data]'s when inherited
    from trainer import preflight

    raw = f'\n[[data.mixture]]\nsource = "tfds"\ntrain = "{sets}/tfds/beta/1.0.0"\nsplit = "test"\n'
    with pytest.raises(RecipeError, match=r'data.mixture\[2\].split = "test": .* has no split "test" \(its splits'):
        preflight.check_paths(mixture(sets, raw), sets / "workdir")
    raw = f'\n[[data.mixture]]\ntrain = "{sets}/tfds/beta/1.0.0"\nimage_key = "image"\n'
    with pytest.raises(BadDataError, match=r'no image under data.mixture\[2\].image_key = "image" \(keys: \[.jpg.'):
        next(data.open_stage(mixture(sets, raw), 0, data.Host()))
    raw = f'\n[[data.mixture]]\ntrain = "{sets}/wds/nothing-*.tar"\nsource = "webdataset"\n'
    with pytest.raises(RecipeError, match=r'data.mixture\[2\].train = ".*/nothing-\*.tar" matches no files'):
        preflight.check_paths(mixture(sets, raw), sets / "workdir")


# --- eval sets: preparation and the evals that read them --------------------------------------------------------

# The first four images of ImageNet's validation set, as the devkit's ground truth labels them (ILSVRC2012_IDs) and
# as Caffe's val.txt does (class indices in sorted-synset order): sea snake, alp ("mountain"), Shetland sheepdog,
# soup bowl. The two files agree only through the devkit's id order shipped in trainer/evals/data.
DEVKIT_IDS, CLASS_INDICES = (490, 361, 171, 822), (65, 970, 230, 809)
SYNSETS = {"n01440764": 0, "n01751748": 65, "n15075141": 999}  # tench, sea snake, toilet tissue


def shard_labels(directory: Path, prefix: str = "val") -> dict[str, int]:
    from trainer.data.tfsetup import tf

    out = {}
    for record in tf.data.TFRecordDataset(sorted(str(p) for p in directory.glob(f"{prefix}-*.tfrecord"))):
        ex = tf.train.Example.FromString(record.numpy()).features.feature
        out[ex["key"].bytes_list.value[0].decode()] = int(ex["label"].int64_list.value[0])
    return out


def prepare(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prepare_imagenet_val_from_the_layouts_users_have(tmp_path, fashion):
    images, _ = fashion
    folders = tmp_path / "by-synset"
    for n, wnid in enumerate(SYNSETS):
        (folders / wnid).mkdir(parents=True)
        for k in range(2):
            (folders / wnid / f"ILSVRC2012_val_{10 * n + k + 1:08d}.JPEG").write_bytes(jpeg(images[2 * n + k]))
    out = prepare("imagenet-val", folders, tmp_path / "a", "--shards", "2")
    assert out.exit_code == 0 and "val: 6 images" in out.output, out.output
    assert shard_labels(tmp_path / "a") == {
        f"ILSVRC2012_val_{10 * n + k + 1:08d}.JPEG": label for n, label in enumerate(SYNSETS.values()) for k in range(2)
    }
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(1, 6):  # 5 images; the labels below cover the first 4
        (flat / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(images[i]))
    expected = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": c for i, c in enumerate(CLASS_INDICES)}
    label_files = {
        "ILSVRC2012_validation_ground_truth.txt": "".join(f"{i}\n" for i in DEVKIT_IDS),
        "val.txt": "".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {c}\n" for i, c in enumerate(CLASS_INDICES)),
        "LOC_val_solution.csv": "ImageId,PredictionString\n"  # Kaggle's: the synset first, then boxes
        + "".join(
            f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4 {w} 5 6 7 8\n"
            for i, w in enumerate(("n01751748", "n09193705", "n02105855", "n04263257"))
        ),
    }
    for name, text in label_files.items():
        (tmp_path / name).write_text(text)
        out = prepare("imagenet-val", flat, tmp_path / name.split(".")[0], "--labels", tmp_path / name)
        assert out.exit_code == 0 and "val: 4 images" in out.output and "1 images without a label" in out.output
        assert shard_labels(tmp_path / name.split(".")[0]) == expected, name
    mistakes = [
        (("imagenet-val", flat, tmp_path / "x"), "holds 5 images and no synset folders: pass --labels"),
        (("imagenet-val", folders, tmp_path / "x", "--labels", tmp_path / "val.txt"), "leave out --labels"),
        (("imagenet-val", flat, tmp_path / "x", "--labels", tmp_path / "bad.txt"), "bad.txt:2: expected FILE LABEL"),
    ]
    (tmp_path / "bad.txt").write_text("a.JPEG 1\nb.JPEG n99999999\n")
    (folders / "n00000000").mkdir()
    for args, message in mistakes[:2]:
        out = prepare(*args)
        assert out.exit_code == 2 and message in out.output, out.output
    out = prepare(*mistakes[2][0])
    assert out.exit_code == 2 and mistakes[2][1] in out.output, out.output
    (folders / "n00000000").rmdir()
    (folders / "n99999999").mkdir()
    out = prepare("imagenet-val", folders, tmp_path / "x")
    assert out.exit_code == 2 and "n99999999 is not one of ImageNet-1k's 1,000 synsets" in out.output


def karpathy_json(root: Path, fashion, kind: str) -> Path:
    """Karpathy's dataset_coco.json (filepath val2014/ or train2014/) or dataset_flickr30k.json (no filepath) with
    real images: 3 test images of 5 captions, 2 train, 1 val."""
    images, labels = fashion
    entries = []
    for i, split in enumerate(("test", "test", "test", "train", "train", "val")):
        name = f"COCO_val2014_{i:012d}.jpg" if kind == "coco" else f"{1000 + i}.jpg"
        folder = root / ("val2014" if kind == "coco" else "flickr30k-images")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg(images[50 + i]))
        sentences = [{"raw": f" {caption('alpha', labels[50 + i])} {k}.", "tokens": []} for k in range(5)]
        entry = {"filename": name, "split": split, "sentences": sentences, "imgid": i}
        if kind == "coco":
            entry["filepath"] = "val2014"
        entries.append(entry)
    path = root / f"dataset_{kind}.json"
    path.write_text(json.dumps({"images": entries, "dataset": kind}))
    return path


def test_prepare_karpathy_splits_of_coco_and_flickr30k(tmp_path, fashion):
    from trainer.evals.retrieval import read_karpathy

    coco = karpathy_json(tmp_path / "coco", fashion, "coco")
    flickr = karpathy_json(tmp_path / "flickr", fashion, "flickr30k")
    for src, images in (
        (coco, tmp_path / "coco"),
        (coco, tmp_path / "coco" / "val2014"),
        (flickr, flickr.parent / "flickr30k-images"),
    ):
        out = prepare("karpathy", src, images, tmp_path / "out")
        assert out.exit_code == 0 and "test: 3 images, 15 captions" in out.output, out.output
        files, captions, owner = read_karpathy(str(tmp_path / "out" / "karpathy.json"), "evals[0]")
        assert [Path(f).parent == tmp_path / "out" / "images" and Path(f).is_file() for f in files] == [True] * 3
        assert owner.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and captions[0].startswith("alpha a photo of")
    out = prepare("karpathy", coco, tmp_path / "coco", tmp_path / "val", "--split", "val")
    assert out.exit_code == 0 and "val: 1 images, 5 captions" in out.output
    out = prepare("karpathy", coco, tmp_path / "coco", tmp_path / "x", "--split", "restval")
    assert out.exit_code == 2 and 'has no "restval" images (its splits: test, train, val)' in out.output
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    out = prepare("karpathy", coco, tmp_path / "coco", tmp_path / "x")
    assert out.exit_code == 2 and "1 of the 3 test images are not under" in out.output


def test_webdataset_eval_tars_with_cls_labels_are_a_zero_shot_path(tmp_path, fashion):
    """CLIP_benchmark's layout: DIR/test/N.tar (KEY.jpg + KEY.cls), DIR/classnames.txt and
    DIR/zeroshot_classification_templates.txt ({c} marks the class name)."""
    from trainer.data.tokenizers import from_recipe
    from trainer.evals.zeroshot import ZeroShot, labelled_images

    wds = tmp_path / "wds_fashion"
    write_tars(wds / "test", fashion, range(300, 325), "alpha", per_tar=10, cls=True)  # 10 + 10 + 5
    (wds / "classnames.txt").write_text("\n".join(FASHION_CLASSES) + "\n")
    (wds / "zeroshot_classification_templates.txt").write_text("a photo of a {c}\n{c}\n")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    r = tiny(tmp_path, f"evals.0.path={wds}/test/*.tar", "evals.0.classnames=''", "evals.0.templates=''")
    zs = ZeroShot(r, r.evals[0], "evals[0]", from_recipe(r))
    assert (zs.classes, zs.templates) == (10, 2)  # found beside the tars, not ImageNet's and CLIP's
    images, labels = fashion
    batches, count = labelled_images(zs.files, 21, 8)
    got = [
        (pixels, label)
        for b_pixels, b_labels in batches.as_numpy_iterator()
        for pixels, label in zip(b_pixels, b_labels, strict=True)
    ]
    assert count == 25 and [int(label) for _, label in got] == labels[300:325].tolist()
    assert all(p.shape == (21, 21, 3) for p, _ in got)
    with tarfile.open(wds / "test" / "00003.tar", "w") as tar:  # a sample without its label fails the eval, named
        info = tarfile.TarInfo("s9999999.jpg")
        info.size = len(payload := jpeg(images[0]))
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(Exception, match=r"00003.tar: sample s9999999 has no .cls label"):
        list(labelled_images(sorted(str(p) for p in (wds / "test").glob("*.tar")), 21, 8, count=26)[0])


# --- the real trainer ---------------------------------------------------------------------------------------------


def train(recipe_path: Path, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The trainer on `recipe_path` (the test run's XLA cache: TRAINER_COMPILE_CACHE, conftest)."""
    fast = [
        "stages.0.samples=32",
        "stages.0.global_batch=8",
        "stages.0.warmup_steps=1",
        "log.every_steps=1",
        "text.context_length=10",
    ]
    args = [sys.executable, "-m", "trainer", str(recipe_path), "--workdir", str(workdir)]
    settings = dict(item.split("=", 1) for item in [*fast, *overrides])  # a later one wins
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return warm.run(args, env=env, cwd=ROOT, timeout=280)


@pytest.mark.slow
def test_the_trainer_trains_on_a_mixture_of_a_tfds_builder_and_tars_with_every_eval_format(sets, fashion, tmp_path):
    from trainer.metrics import read_jsonl

    # the eval sets, each in the format a user gets from the prepare commands or from CLIP_benchmark
    wds = tmp_path / "wds_fashion"
    write_tars(wds / "test", fashion, range(300, 316), "alpha", per_tar=8, cls=True)
    (wds / "classnames.txt").write_text("\n".join(FASHION_CLASSES) + "\n")
    (wds / "zeroshot_classification_templates.txt").write_text("alpha a photo of a {c}\n")
    folders = tmp_path / "imagenet"
    for n, wnid in enumerate(SYNSETS):
        (folders / wnid).mkdir(parents=True)
        (folders / wnid / f"ILSVRC2012_val_{n + 1:08d}.JPEG").write_bytes(jpeg(fashion[0][n]))
    assert prepare("imagenet-val", folders, tmp_path / "imagenet-val", "--shards", "1").exit_code == 0
    (tmp_path / "one_template.txt").write_text("a photo of a {}.\n")
    coco = karpathy_json(tmp_path / "coco", fashion, "coco")
    assert prepare("karpathy", coco, tmp_path / "coco", tmp_path / "coco-test").exit_code == 0
    evals = (
        f'[[evals]]\nkind = "zeroshot"\nname = "imagenet"\npath = "{tmp_path}/imagenet-val/val-*.tfrecord"\n'
        f'templates = "{tmp_path}/one_template.txt"\nbatch = 8\n\n'
        f'[[evals]]\nkind = "retrieval"\nname = "coco"\npath = "{tmp_path}/coco-test/karpathy.json"\nbatch = 8\n'
    )
    cls_eval = [f"evals.0.path={wds}/test/*.tar", "evals.0.classnames=''", "evals.0.templates=''", "evals.0.batch=8"]

    # one trainer run: the mixture (alpha's TFDS builder 3 : beta's webdataset tars 1), with the webdataset, ImageNet
    # and COCO evals. A TFDS builder as the only source goes through the same data.open_stage, read with OpenVision's
    # keys and resumed in test_a_tfds_builder_is_read_with_its_keys_and_resumes_exactly
    path = mixture_file(sets, "\n" + evals)
    r = train(path, tmp_path / "mix-run", *[f"{k}={v}" for k, v in MIX_SETTINGS.items()], *cls_eval)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = read_jsonl(tmp_path / "mix-run" / "metrics.jsonl")
    assert [rec["step"] for rec in records] == [1, 2, 3, 4] and all(math.isfinite(rec["loss"]) for rec in records)
    end = records[-1]
    assert end["fashion_mnist/samples"] == 16 and end["imagenet/samples"] == 3 and end["coco/images"] == 3
    assert 0 <= end["fashion_mnist/top1"] <= 1 and 0 <= end["coco/i2t_r@1"] <= end["coco/i2t_r@5"] <= 1
    assert end["data_bad"] == 0
    checkpoints = sorted((tmp_path / "mix-run" / "fmnist21" / "checkpoints").iterdir())
    assert checkpoints, "no checkpoint"
    assert "imagenet" in r.stdout and "coco" in r.stdout


def test_a_tfds_builder_in_a_bucket_is_found_and_checked(sets, bucket):
    """The builder's files listed through epath (gcsfs) against the GCS emulator: what every host does at start."""
    from trainer import preflight, storage
    from trainer.data import sources

    local = sets / "tfds" / "alpha" / "1.0.0"
    remote = f"{bucket}/tfds/alpha/1.0.0"
    for path in local.iterdir():
        storage.at(f"{remote}/{path.name}").write_bytes(path.read_bytes())
    evals = [f"evals.0.path={local}/alpha-validation.tfrecord-*", "evals.0.classnames=''", "evals.0.templates=''"]
    r = tfds_recipe(sets, f"data.train={remote}", *evals)
    preflight.check_paths(r, sets / "workdir")
    files, counts = sources.shards(r.data.sources()[0])
    assert files == [f"{remote}/alpha-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    assert sum(counts.values()) == 120
    with pytest.raises(
        RecipeError,
        match=rf'data.train = "{bucket}/tfds/alpha" is not a TFDS builder directory .*'
        rf"did you mean {remote}\?",
    ):
        preflight.check_paths(tfds_recipe(sets, f"data.train={bucket}/tfds/alpha"), sets / "workdir")
