"""Where a training source's records are: its shard files and, where known, each shard's record count.

tfrecord / webdataset: `train` is comma-separated paths or globs (local or gs://); the counts come from the shard
set's index.json, where there is one. tfds: `train` is a TFDS builder directory (`.../NAME/VERSION`, the folder
holding dataset_info.json and features.json) and `split` names the split(s); TensorFlow Datasets says which files
hold the split and how many records each has. A TFDS record is a tf.Example, so the TFRecord pipeline reads it as
it is, with the source's image and caption keys.

`check_builder` reads dataset_info.json alone (JSON through epath, no TensorFlow): preflight's first pass uses it.
"""

from __future__ import annotations

from typing import Any

from trainer import storage
from trainer.recipe import TFDS_INFO, RecipeError, Source


def shards(source: Source) -> tuple[list[str], dict[str, int]]:
    """(the source's shard files in a fixed order, {file: record count} for those whose count is known)."""
    if source.source == "tfds":
        return tfds_shards(source)
    from trainer.data import examples

    files = storage.list_files(source.train, source.key("train"))
    return files, examples.read_index(files)


def check_builder(source: Source) -> dict[str, Any]:
    """dataset_info.json of the source's builder directory, checked: it exists, stores TFRecord files and has the
    split(s); a RecipeError naming the key otherwise."""
    key, directory = source.key("train"), source.train.rstrip("/")
    path = storage.at(f"{directory}/{TFDS_INFO}")
    try:
        exists = path.is_file()
        text = path.read_text() if exists else ""
    except Exception as error:  # an unreadable bucket: gcsfs's own errors as well as OSError
        raise RecipeError(f'{key} = "{source.train}" cannot be read: {storage.describe(error)}') from None
    if not exists:
        raise RecipeError(
            f'{key} = "{source.train}" is not a TFDS builder directory (it has no {TFDS_INFO}){_hint(directory)}'
        )
    return source.check_tfds_info(text)


def tfds_shards(source: Source) -> tuple[list[str], dict[str, int]]:
    """The split's files as TensorFlow Datasets names them, with their record counts (its shard lengths)."""
    check_builder(source)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(storage.at(source.train.rstrip("/"))))  # absolute: tf.data's paths
    files: list[str] = []
    counts: dict[str, int] = {}
    for name in source.split.split("+"):
        info = builder.info.splits[name]
        for path, count in zip(info.filepaths, info.shard_lengths, strict=True):
            files.append(str(path))
            counts[str(path)] = int(count)
    if not files:
        raise RecipeError(f'{source.key("split")} = "{source.split}" of {source.train} has no files')
    return files, counts


def _hint(directory: str) -> str:
    """Where a builder directory below `directory` is, if one is (users often name the dataset's folder, not its
    version's)."""
    try:
        found = storage.glob(f"{directory}/*/{TFDS_INFO}") or storage.glob(f"{directory}/*/*/{TFDS_INFO}")
    except Exception:
        return ""
    return f": did you mean {found[0].rsplit('/', 1)[0]}?" if found else ""
