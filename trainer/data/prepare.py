"""python -m trainer.data.prepare COMMAND ...: turn data you have into the trainer's TFRecord shards.

fashion-mnist SRC OUT   Fashion-MNIST IDX files -> train shards (captions from templates) + labelled test shards,
                        class names, prompt templates and a WordPiece vocab built from the captions
folder IMAGES CAPTIONS OUT
                        an image folder + a captions file (TSV `file<TAB>caption[<TAB>recaption]` or JSONL with
                        `file`, `caption`, optional `recaption`, `label`) -> shards
tuxpaint [SRC] OUT      Tux Paint's stamps (Debian: tuxpaint-stamps-default; PNG + English caption each) -> train
                        shards, and a held-out set as images + a Karpathy-split JSON for the retrieval eval
vocab SHARDS --out F    a WordPiece vocab learned from the shards' captions
imagenet-val SRC OUT [--labels F]
                        ImageNet-1k validation (a folder per synset, or flat files + the devkit's ground truth or
                        FILE LABEL lines) -> labelled shards for the zero-shot eval (ImageNet's class names)
karpathy JSON IMAGES OUT
                        COCO / Flickr30k with Karpathy's split (dataset_coco.json, dataset_flickr30k.json) -> the
                        split's images + OUT/karpathy.json for the retrieval eval
(webdataset eval tars with .cls labels, CLIP_benchmark's, need no preparing: name them as a zero-shot eval's path)
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import click
import numpy as np

from trainer.errors import UserError

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Alt-text styles for training captions, and the prompts zero-shot evaluation averages over.
FASHION_CAPTIONS = (
    "a photo of a {}.",
    "a {} on a black background",
    "{}",
    "a black and white photo of a {}.",
    "a low resolution photo of the {}.",
    "a grayscale product image of a {}",
    "catalogue item: {}",
    "a small picture of a {}.",
)
FASHION_RECAPTION = "a grayscale product photo of a {}."
FASHION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of the {}.", "{}")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_HOME = "/usr/share/datasets/fashion-mnist"  # Debian: apt install dataset-fashion-mnist
FASHION_VERSION = 2  # of what fashion-mnist writes (OUT/prepared.json); .ci/demo re-prepares any other version
TUXPAINT_HOME = "/usr/share/tuxpaint/stamps"  # Debian: apt install tuxpaint-stamps-default


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Prepare TFRecord shards for the trainer."""


@main.command("fashion-mnist")
@click.argument("src", type=click.Path(file_okay=False), default=FASHION_HOME)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shards", default=8, show_default=True, help="Training shards.")
@click.option("--vocab-size", default=600, show_default=True, help="WordPiece vocabulary size (0 = no vocab).")
def fashion_mnist(src: str, out: str, shards: int, vocab_size: int) -> None:
    """Fashion-MNIST (IDX files in SRC) -> OUT/train-*, OUT/test-* shards, classnames.txt, templates.txt, vocab.txt."""
    from trainer.data import examples
    from trainer.data.tokenizers import build_vocab

    source, out_dir = Path(src), Path(out)
    missing = [n for pair in FASHION_FILES.values() for n in pair if not (source / n).exists()]
    if missing:
        raise UserError(
            f"{source} lacks {', '.join(missing)}: on Debian/Ubuntu `apt install dataset-fashion-mnist` puts them in"
            f" {FASHION_HOME}; elsewhere download the four IDX files of Fashion-MNIST there"
        )
    from trainer.data.tfsetup import tf

    captions = []
    for split, (images_name, labels_name) in FASHION_FILES.items():
        images, labels = read_idx(source / images_name), read_idx(source / labels_name)
        writer = examples.ShardWriter(out_dir, split, shards if split == "train" else 2)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = FASHION_CLASSES[label]
            caption = FASHION_CAPTIONS[i % len(FASHION_CAPTIONS)].format(name)
            png = tf.io.encode_png(image[:, :, None]).numpy()
            texts = {"txt": caption, "llava_caption": FASHION_RECAPTION.format(name)}
            writer.write(examples.encode(png, texts, label=int(label), key=f"{split}-{i}"))
            captions += [caption] if split == "train" else []
        click.echo(f"{split}: {writer.close()} samples -> {out_dir}/{split}-*.tfrecord")
    (out_dir / "prepared.json").write_text(json.dumps({"fashion-mnist": FASHION_VERSION}) + "\n")
    (out_dir / "classnames.txt").write_text("\n".join(FASHION_CLASSES) + "\n")
    (out_dir / "templates.txt").write_text("\n".join(FASHION_TEMPLATES) + "\n")
    if vocab_size:
        corpus = captions + [FASHION_RECAPTION.format(n) for n in FASHION_CLASSES] + list(FASHION_CLASSES)
        size = build_vocab(tf.data.Dataset.from_tensor_slices(corpus), vocab_size, out_dir / "vocab.txt")
        click.echo(f"vocab: {size} word pieces -> {out_dir}/vocab.txt")


@main.command("vocab")
@click.argument("shards")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The vocab file to write.")
@click.option("--size", default=32_000, show_default=True, help="Vocabulary size, reserved tokens included.")
@click.option("--caption-key", multiple=True, default=("txt", "llava_caption"), show_default=True)
def vocab(shards: str, out: str, size: int, caption_key: tuple[str, ...]) -> None:
    """A WordPiece vocab learned from the captions in SHARDS (comma-separated paths or globs)."""
    from trainer.data import examples
    from trainer.data.tfsetup import tf
    from trainer.data.tokenizers import build_vocab
    from trainer.recipe import RecipeError
    from trainer.storage import list_files

    try:
        files = list_files(shards, "SHARDS")
    except RecipeError as e:
        raise UserError(str(e)) from None
    records = tf.data.TFRecordDataset(files).map(lambda r: examples.parse(r, caption_key))
    texts = records.flat_map(lambda ex: tf.data.Dataset.from_tensor_slices([ex[k] for k in caption_key]))
    texts = texts.filter(lambda t: tf.strings.length(t) > 0)
    click.echo(f"vocab: {build_vocab(texts, size, Path(out))} word pieces -> {out}")


@main.command("webdataset")
@click.argument("tars")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shards", default=4, show_default=True)
@click.option("--prefix", default="train", show_default=True, help="Shard file prefix (train, val, ...).")
@click.option("--recaption-key", default="llava_caption", show_default=True, help="JSON field of the re-caption.")
def webdataset_to_tfrecord(tars: str, out: str, shards: int, prefix: str, recaption_key: str) -> None:
    """webdataset tars (comma-separated paths or globs, as img2dataset writes them) -> OUT/PREFIX-*.tfrecord."""
    from trainer.data import examples, webdataset
    from trainer.recipe import RecipeError
    from trainer.storage import list_files

    try:
        files = list_files(tars, "TARS")
    except RecipeError as e:
        raise UserError(str(e)) from None
    writer = examples.ShardWriter(Path(out), prefix, shards)
    for tar in files:
        for key, parts in webdataset.samples(tar):
            writer.write(webdataset.to_example(key, parts, "txt", recaption_key))
    click.echo(f"{prefix}: {writer.close()} samples from {len(files)} tars -> {out}/{prefix}-*.tfrecord")


@main.command("folder")
@click.argument("images", type=click.Path(exists=True, file_okay=False))
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shards", default=4, show_default=True)
@click.option("--prefix", default="train", show_default=True, help="Shard file prefix (train, val, ...).")
def folder(images: str, captions: str, out: str, shards: int, prefix: str) -> None:
    """Images in IMAGES with captions from CAPTIONS (TSV or JSONL) -> OUT/PREFIX-*.tfrecord."""
    from trainer.data import examples

    rows = read_captions(Path(captions))
    writer = examples.ShardWriter(Path(out), prefix, shards)
    skipped = 0
    for row in rows:
        path = Path(images) / row["file"]
        if not path.is_file():
            skipped += 1
            continue
        texts = {"txt": row["caption"]}
        if row.get("recaption"):
            texts["llava_caption"] = row["recaption"]
        writer.write(examples.encode(path.read_bytes(), texts, label=row.get("label"), key=row["file"]))
    total = writer.close()
    click.echo(
        f"{prefix}: {total} samples -> {out}/{prefix}-*.tfrecord" + (f" ({skipped} missing files)" if skipped else "")
    )


@main.command("tuxpaint")
@click.argument("src", type=click.Path(file_okay=False), default=TUXPAINT_HOME)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--heldout", default=150, show_default=True, help="Stamps held out of training, for retrieval.")
@click.option("--shards", default=4, show_default=True)
@click.option(
    "--vocab-size",
    default=0,
    show_default=True,
    help="Also learn a WordPiece vocab of this size (0: none; recipes/tuxpaint.toml uses CLIP's BPE).",
)
def tuxpaint(src: str, out: str, heldout: int, shards: int, vocab_size: int) -> None:
    """Tux Paint stamps in SRC (NAME.png + NAME.txt, whose first line is the English caption) -> OUT/train-* shards,
    OUT/heldout/*.jpg + OUT/karpathy.json (split "test"), optionally OUT/vocab.txt. Transparent pixels become white;
    the held-out stamps are a seeded random choice."""
    from trainer.data import examples
    from trainer.data.tfsetup import tf
    from trainer.data.tokenizers import build_vocab

    stamps = []
    for png in sorted(Path(src).rglob("*.png")):
        text = png.with_suffix(".txt")
        caption = text.read_text(errors="replace").splitlines()[0].strip() if text.is_file() else ""
        if caption:
            stamps.append((png, caption))
    if len(stamps) <= heldout:
        raise UserError(
            f"{src} has {len(stamps)} captioned PNG stamps, not more than --heldout {heldout}: on Debian/Ubuntu"
            f" `apt install tuxpaint-stamps-default` puts them in {TUXPAINT_HOME}"
        )
    order = np.random.default_rng(0).permutation(len(stamps))
    out_dir = Path(out)
    (out_dir / "heldout").mkdir(parents=True, exist_ok=True)
    writer = examples.ShardWriter(out_dir, "train", shards)
    entries, captions = [], []
    for rank, i in enumerate(order):
        png, caption = stamps[i]
        rgba = tf.cast(tf.io.decode_png(png.read_bytes(), channels=4), tf.float32)
        rgb = rgba[..., :3] * rgba[..., 3:] / 255.0 + 255.0 * (1 - rgba[..., 3:] / 255.0)  # over white
        jpeg = tf.io.encode_jpeg(tf.cast(tf.round(rgb), tf.uint8), quality=95).numpy()
        name = f"{png.parent.name}-{png.stem}.jpg"
        if rank < heldout:
            (out_dir / "heldout" / name).write_bytes(jpeg)
            entries.append({"filepath": "heldout", "filename": name, "split": "test", "sentences": [{"raw": caption}]})
        else:
            writer.write(examples.encode(jpeg, {"txt": caption}, key=name))
            captions.append(caption)
    (out_dir / "karpathy.json").write_text(json.dumps({"images": entries}, indent=1) + "\n")
    click.echo(f"train: {writer.close()} samples -> {out_dir}/train-*.tfrecord")
    click.echo(f"held out: {len(entries)} images -> {out_dir}/heldout/, {out_dir}/karpathy.json")
    if vocab_size:
        size = build_vocab(tf.data.Dataset.from_tensor_slices(captions), vocab_size, out_dir / "vocab.txt")
        click.echo(f"vocab: {size} word pieces -> {out_dir}/vocab.txt")


@main.command("imagenet-val")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    help="For flat files: ILSVRC2012_validation_ground_truth.txt (the devkit's), or FILE LABEL lines (LABEL a synset"
    " id or a class index 0-999 in sorted-synset order, e.g. Caffe's val.txt, Kaggle's LOC_val_solution.csv).",
)
@click.option("--shards", default=16, show_default=True)
def imagenet_val(src: str, out: str, labels: str | None, shards: int) -> None:
    """ImageNet-1k validation images in SRC (a folder per synset, or flat files with --labels) -> OUT/val-*.tfrecord,
    labelled in the class order of the shipped ImageNet class names (the zero-shot eval's default).

    Example: python -m trainer.data.prepare imagenet-val ~/imagenet/val data/imagenet-val
    """
    from trainer.data import evalsets, examples

    pairs, notes = evalsets.imagenet_val(Path(src), Path(labels) if labels else None)
    writer = examples.ShardWriter(Path(out), "val", shards)
    for path, label in pairs:
        writer.write(examples.encode(path.read_bytes(), {}, label=label, key=path.name))
    total = writer.close()
    click.echo(f"val: {total} images -> {out}/val-*.tfrecord" + (f" ({'; '.join(notes)})" if notes else ""))
    click.echo(f'a zero-shot eval of it: [[evals]] kind = "zeroshot", path = "{out}/val-*.tfrecord"')


@main.command("karpathy")
@click.argument("split_json", metavar="JSON", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, help="The Karpathy split to keep (test, val).")
def karpathy(split_json: str, images: str, out: str, split: str) -> None:
    """COCO or Flickr30k with Karpathy's split (JSON: dataset_coco.json / dataset_flickr30k.json; IMAGES: COCO's
    folder holding val2014/, or flickr30k-images/) -> OUT/images/ + OUT/karpathy.json, the retrieval eval's path.

    Example: python -m trainer.data.prepare karpathy dataset_coco.json ~/coco data/coco-test
    """
    from trainer.data import evalsets

    count, captions = evalsets.karpathy(Path(split_json), Path(images), Path(out), split)
    click.echo(f"{split}: {count} images, {captions} captions -> {out}/images/, {out}/karpathy.json")
    click.echo(f'a retrieval eval of it: [[evals]] kind = "retrieval", path = "{out}/karpathy.json"')


def read_captions(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not JSON ({e.msg})") from None
        else:
            fields = line.split("\t")
            if len(fields) < 2:
                raise UserError(f"{path}:{number}: expected file<TAB>caption[<TAB>recaption]")
            row = {"file": fields[0], "caption": fields[1], "recaption": fields[2] if len(fields) > 2 else ""}
        if "file" not in row or "caption" not in row:
            raise UserError(f"{path}:{number}: needs 'file' and 'caption'")
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
