"""The standard eval sets as users have them on disk -> the formats the evals read (trainer/evals).

ImageNet-1k validation -> labelled TFRecord shards for the zero-shot eval (labels in the sorted-synset order of the
shipped class names), from
- a folder per synset: `SRC/n01440764/ILSVRC2012_val_00000293.JPEG` (what valprep.sh or torchvision's layout gives);
- the 50,000 flat files plus a labels file, one of
  - the devkit's `ILSVRC2012_validation_ground_truth.txt`: one ILSVRC2012_ID (1-1000, the devkit's order) per line,
    line N for `ILSVRC2012_val_000N.JPEG` (N in 8 digits);
  - `FILE LABEL` lines (whitespace or comma; a header line is skipped): LABEL a synset id (`n01751748`, also the
    first word of Kaggle's LOC_val_solution.csv) or a class index 0-999 in sorted-synset order (Caffe's val.txt);
    FILE with or without its extension.
COCO (Karpathy's dataset_coco.json) and Flickr30k (dataset_flickr30k.json) -> one split's images copied beside a
Karpathy-split JSON, the retrieval eval's format.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from trainer.errors import UserError

SYNSETS = Path(__file__).resolve().parents[1] / "evals" / "data"
SYNSET = re.compile(r"n\d{8}")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp"}


def synsets(order: str = "sorted") -> list[str]:
    """ImageNet-1k's synset ids, sorted (class index order) or in the devkit's ILSVRC2012_ID order."""
    name = "imagenet_synsets.txt" if order == "sorted" else "imagenet_devkit_synsets.txt"
    return (SYNSETS / name).read_text().split()


def imagenet_val(src: Path, labels: Path | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, class index) pairs of an ImageNet validation folder, sorted by file name, and notes on what was left
    out (listed but missing, found but unlabelled)."""
    if not src.is_dir():
        raise UserError(f"{src} is not a folder")
    index = {wnid: i for i, wnid in enumerate(synsets())}
    folders = sorted(p for p in src.iterdir() if p.is_dir() and SYNSET.fullmatch(p.name))
    if folders:
        if labels is not None:
            raise UserError(f"{src} has a folder per synset, which labels its images: leave out --labels")
        unknown = [f.name for f in folders if f.name not in index]
        if unknown:
            raise UserError(f"{src}/{unknown[0]} is not one of ImageNet-1k's 1,000 synsets")
        pairs = [(p, index[f.name]) for f in folders for p in sorted(f.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        return pairs, []
    images = {p.name: p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise UserError(f"{src} has neither synset folders (n01440764/...) nor images")
    if labels is None:
        raise UserError(
            f"{src} holds {len(images)} images and no synset folders: pass --labels (the devkit's"
            " ILSVRC2012_validation_ground_truth.txt, or FILE LABEL lines)"
        )
    by_stem = {p.stem: p for p in images.values()}
    labelled = read_imagenet_labels(labels, index)
    pairs, missing = [], []
    for name, label in labelled.items():
        path = images.get(name) or by_stem.get(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
        if path is None:
            missing.append(name)
        else:
            pairs.append((path, label))
    notes = []
    if missing:
        notes.append(f"{len(missing)} labelled files missing, e.g. {missing[0]}")
    unlabelled = len(images) - len(pairs)
    if unlabelled:
        notes.append(f"{unlabelled} images without a label")
    if not pairs:
        raise UserError(f"no image of {src} has a label in {labels} ({'; '.join(notes)})")
    return sorted(pairs, key=lambda pair: pair[0].name), notes


def read_imagenet_labels(path: Path, index: dict[str, int]) -> dict[str, int]:
    """{file name or stem: class index} from a devkit ground-truth file or FILE LABEL lines (see the module)."""
    try:
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--labels {path} cannot be read: {error}") from None
    if lines and all(line.isdigit() for _, line in lines):  # the devkit's ground truth: ILSVRC2012_IDs, 1-based
        devkit = synsets("devkit")
        out = {}
        for number, line in lines:
            if not 1 <= int(line) <= len(devkit):
                raise UserError(f"{path}:{number}: {line} is not an ILSVRC2012_ID (1-1000)")
            out[f"ILSVRC2012_val_{number:08d}"] = index[devkit[int(line) - 1]]
        return out
    out = {}
    for number, line in lines:
        fields = re.split(r"[,\s]+", line)
        label = label_of(fields[1], index) if len(fields) > 1 else None
        if label is None and number == lines[0][0]:
            continue  # a header ("ImageId,PredictionString")
        if label is None or label not in range(1000):
            raise UserError(
                f"{path}:{number}: expected FILE LABEL, LABEL a synset id (n01440764) or a class index 0-999, or"
                " one ILSVRC2012_ID per line (the devkit's ground truth)"
            )
        out[fields[0]] = label
    return out


def label_of(text: str, index: dict[str, int]) -> int | None:
    """A class index given as itself or as its synset id."""
    return int(text) if text.isdigit() else index.get(text)


def karpathy(split_json: Path, images: Path, out: Path, split: str = "test") -> tuple[int, int]:
    """One split of a Karpathy-split JSON: its images copied to OUT/images/, OUT/karpathy.json naming them with their
    captions (the retrieval eval's `path`). Images are looked up as IMAGES/filepath/filename, then IMAGES/filename
    (so IMAGES may be COCO's root or its val2014/ folder). Returns (images, captions)."""
    try:
        entries = json.loads(split_json.read_text())["images"]
        chosen = [e for e in entries if e["split"] == split]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f'{split_json} is not a Karpathy-split JSON ({{"images": [...]}}): {error}') from None
    if not chosen:
        found = sorted({str(e.get("split")) for e in entries})
        raise UserError(f'{split_json} has no "{split}" images (its splits: {", ".join(found)})')
    sources, missing = [], []
    for entry in chosen:
        candidates = [images / entry.get("filepath", "") / entry["filename"], images / entry["filename"]]
        found_path = next((p for p in candidates if p.is_file()), None)
        if found_path is None:
            missing.append(str(candidates[0]))
        sources.append(found_path)
    if missing:
        raise UserError(f"{len(missing)} of the {len(chosen)} {split} images are not under {images}, e.g. {missing[0]}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    written, captions = [], 0
    for entry, source in zip(chosen, sources, strict=True):
        assert source is not None
        shutil.copyfile(source, out / "images" / entry["filename"])
        sentences = [{"raw": s["raw"].strip()} for s in entry["sentences"] if s.get("raw", "").strip()]
        written.append({"filepath": "images", "filename": entry["filename"], "sentences": sentences})
        captions += len(sentences)
    (out / "karpathy.json").write_text(json.dumps({"images": written}, indent=1) + "\n")
    return len(written), captions
