"""python -m trainer.data.prepare COMMAND ...: turn data you have into the trainer's TFRecord shards.

fashion-mnist SRC OUT   Fashion-MNIST IDX files -> train shards (captions from templates) + labelled test shards,
                        class names, prompt templates and a WordPiece vocab built from the captions
folder IMAGES CAPTIONS OUT
                        an image folder + a captions file (TSV `file<TAB>caption[<TAB>recaption]` or JSONL with
                        `file`, `caption`, optional `recaption`, `label`) -> shards
vocab SHARDS --out F    a WordPiece vocab learned from the shards' captions
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
FASHION_RECAPTION = "a grayscale, low resolution product photo of a {}, centred on a plain black background."
FASHION_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of the {}.", "{}")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_HOME = "/usr/share/datasets/fashion-mnist"  # Debian: apt install dataset-fashion-mnist


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
    from trainer.data.tfdata import list_files
    from trainer.data.tfsetup import tf
    from trainer.data.tokenizers import build_vocab
    from trainer.recipe import RecipeError

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
    from trainer.data.tfdata import list_files
    from trainer.recipe import RecipeError

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
