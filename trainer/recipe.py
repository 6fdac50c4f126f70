"""Recipes: one TOML file -> a typed, validated `Recipe`. The schema below is the one source of defaults.

Every key is checked once, at start-up: an unknown key, a wrong type, an impossible value or a key set twice is one
`RecipeError` line naming the key (e.g. `stages[1].resolution = 10 is smaller than the patch size 16 of
model.image = "B/16"`). `--set key=value` overrides any key before validation (`stages.1.global_batch=256`).
Checks that need the machine (batch divisible by the device count) are in `check_devices`, run once JAX is up.

Standard library only: `tpuctl` reads recipes too, and must not import jax.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.models import variants

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

IMAGE_VARIANTS = tuple(variants.IMAGE)  # the variant table (standard library, as this module)
TEXT_VARIANTS = tuple(variants.TEXT)
PATCH_SIZES = (4, 7, 8, 14, 16, 32)


class RecipeError(ValueError):
    """A recipe problem, as one line naming the key."""


@dataclass(frozen=True)
class Model:
    image: str = "B/16"  # VARIANT/PATCH, e.g. "L/14"
    text: str = "B"  # text tower variant
    # image tower layers; 0 = the variant's (an import of a config with another depth sets it)
    image_depth: int = 0
    text_depth: int = 0  # text tower layers; 0 = the variant's (templated captions need fewer)
    decoder: str = ""  # caption decoder variant ("" = none); OpenVision trains with one
    # what the decoder cross-attends to: the image's tokens and the alt-text's (OpenVision), or the image's alone
    # (CapPa-style: where the alt-text already names what the caption says, only then must the image tell it)
    decoder_context: Literal["image+text", "image"] = "image+text"
    # "causal": teacher-forced, causal self-attention over the caption so far and cross-attention to the context
    # (CoCa's); "queries": OpenVision's: the context's tokens (before the towers' final LayerNorm) and one learned
    # query per caption position in one transformer, the queries causal among themselves, all predicted at once
    decoder_style: Literal["causal", "queries"] = "causal"
    pooling: Literal["mean", "cls", "map"] = "mean"  # the image embedding: mean of the tokens, class token, or MAP head
    posemb: Literal["sincos2d", "learned"] = "sincos2d"  # image position embeddings: fixed 2-D sin-cos, or learned
    # open_clip's (OpenAI's) choices where OpenVision's differ; `python -m trainer.convert import` writes them out
    class_token: bool = False  # a class token in the image sequence whatever the pooling (open_clip's ViTs have one)
    ln_pre: bool = False  # a LayerNorm before the image tower's blocks
    norm_after_pool: bool = False  # the image tower's final LayerNorm after pooling, not before (CLIPA)
    activation: Literal["gelu_tanh", "gelu", "quick_gelu"] = "gelu_tanh"  # MLPs; "gelu" = erf, torch's default
    # the text tower's MLPs, where they differ from the image tower's ("" = model.activation); OpenVision: exact GELU
    # in the image tower, tanh GELU in the text tower
    text_activation: Literal["", "gelu_tanh", "gelu", "quick_gelu"] = ""
    norm_eps: float = 1e-6  # LayerNorm epsilon (torch's: 1e-5)
    # [-1, 1], or a per-channel mean and std: CLIP's ("openai") or ImageNet's ("imagenet": OpenVision's)
    pixel_norm: Literal["inception", "openai", "imagenet"] = "inception"
    text_causal: bool = False  # causal attention in the text tower (OpenAI's CLIP)
    text_pooling: Literal["last", "argmax"] = "last"  # argmax: at the end-of-text token, CLIP BPE's highest id
    embed_dim: int = 0  # output width; 0 = the variant's (Ti 192, S 384, B 512, L 768, So400m 1152, H 1024)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # parameters as stored and updated
    # what the backward pass recomputes of each block (every tower's): nothing, all of it ("block"), all but the
    # matmuls ("dots"); "auto": per stage, the least recomputation whose step fits the chips' HBM (the plan's choice,
    # and the trainer's on the devices it has: trainer/fitting.py)
    remat: Literal["none", "block", "dots", "auto"] = "none"
    # the image tower's, over model.remat ("" = model.remat); OpenVision recomputes its towers, not its decoder
    image_remat: Literal["", "none", "block", "dots"] = ""
    text_remat: Literal["", "none", "block", "dots"] = ""  # the text tower's ("" = model.remat)
    decoder_remat: Literal["", "none", "block", "dots"] = ""  # the caption decoder's ("" = model.remat)
    # "auto": cuDNN's fused attention on GPUs in bf16/fp16 where its shapes allow, XLA's elsewhere (CPU, TPU, fp32)
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    scan_layers: bool = True  # false: the layer loop unrolled (longer compiles; the same parameters)

    def tower_remat(self, tower: Literal["image", "text", "decoder"]) -> str:
        """The tower's remat policy (none, block or dots) once "auto" is resolved."""
        return getattr(self, f"{tower}_remat") or self.remat

    @property
    def image_variant(self) -> str:
        return self.image.split("/")[0]

    @property
    def patch(self) -> int:
        return int(self.image.split("/")[1])


@dataclass(frozen=True)
class Text:
    tokenizer: Literal["bert_wordpiece", "clip_bpe"] = "bert_wordpiece"  # OpenVision's WordPiece, or CLIP's BPE
    vocab: str = ""  # WordPiece vocab file (OpenVision: bert-base-uncased vocab.txt); synthetic data needs none
    vocab_rows: int = 32_000  # rows of the token tables (at least the vocab's size)
    context_length: int = 80  # encoder tokens (pooled at the last position)
    # where the special tokens go in an encoder row: "eos" = word pieces, [eos], padding; "bos_eos_cls" =
    # OpenVision's training: [bos], word pieces, [eos], padding, [CLS] in the last (pooled) position; "cls_sep" /
    # "cls_pad" = open_clip's Hugging Face BERT tokenizer: [CLS], word pieces, [SEP] (or, with its strip_sep_token,
    # a pad in its place), padding. The last three need a vocab with [CLS] (and [SEP])
    row: Literal["eos", "bos_eos_cls", "cls_sep", "cls_pad"] = "eos"
    caption_length: int = 128  # decoder target tokens


TFDS_INFO = "dataset_info.json"  # a TFDS builder directory's description: its splits, features, file format
CONVERTED_SETTINGS = "model.toml"  # what `python -m trainer.convert import` writes beside params/ (trainer/pretrained)
SOURCE_KEYS = ("source", "train", "split", "image_key", "caption_key", "recaption_key")  # a mixture entry's own


@dataclass(frozen=True)
class Mix:
    """One weighted source of `[[data.mixture]]`; a key left empty ("") is the [data] table's."""

    train: str  # as data.train: shards (comma-separated paths/globs), or a TFDS builder directory
    weight: float = 1.0  # relative: a sample comes from this source with probability weight / sum of the weights
    source: Literal["", "tfrecord", "webdataset", "tfds"] = ""  # as data.source ("" = data.source)
    split: str = ""  # as data.split ("" = data.split)
    image_key: str = ""  # as data.image_key ("" = data.image_key)
    caption_key: str = ""  # as data.caption_key ("" = data.caption_key)
    recaption_key: str = ""  # a key the records lack: the decoder learns this source's alt-text


@dataclass(frozen=True)
class Source:
    """One training source resolved: [data] alone, or a mixture entry with the [data] table's keys filled in
    (`Data.sources()`). `entry` says where it is set ("data", "data.mixture[1]"), `own` which keys the entry sets."""

    entry: str
    source: str
    train: str
    split: str
    image_key: str
    caption_key: str
    recaption_key: str
    weight: float = 1.0
    own: frozenset[str] = frozenset()

    def key(self, name: str) -> str:
        """The recipe key that set `name` (for messages)."""
        return f"{self.entry}.{name}" if name in self.own else f"data.{name}"

    def check_tfds_info(self, text: str) -> dict[str, Any]:
        """The source's TFDS builder's dataset_info.json (`text`) parsed and checked: it has the split(s) named and
        stores TFRecord files; a RecipeError naming the key otherwise. Plain JSON: the trainer's preflight and
        tpuctl (reading the bucket from the user's machine) both check a builder with it."""
        try:
            info = json.loads(text)
            splits = {s["name"]: s for s in info.get("splits", [])}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise RecipeError(
                f'{self.key("train")} = "{self.train}": its {TFDS_INFO} is not TFDS dataset info'
            ) from None
        missing = [name for name in self.split.split("+") if name not in splits]
        if missing:
            raise RecipeError(
                f'{self.key("split")} = "{self.split}": {self.train} has no split "{missing[0]}" (its splits:'
                f" {', '.join(sorted(splits)) or 'none'})"
            )
        file_format = info.get("fileFormat") or "tfrecord"
        if file_format != "tfrecord":
            raise RecipeError(
                f'{self.key("train")} = "{self.train}" stores its records as {file_format}: the trainer reads TFRecord'
                ' builders (prepare the dataset with file_format="tfrecord")'
            )
        return info


@dataclass(frozen=True)
class Data:
    # tfrecord: TFRecord shards of tf.Examples; webdataset: img2dataset's .tar shards; tfds: a TFDS builder directory
    source: Literal["synthetic", "tfrecord", "webdataset", "tfds"] = "synthetic"
    train: str = ""  # files or gs:// glob of the training shards; tfds: the builder directory (holds dataset_info.json)
    split: str = "train"  # tfds: the split read ("train", or several joined: "train+validation")
    image_key: str = "image"  # the encoded image's feature (OpenVision's TFDS builders: "jpg"); webdataset: ignored
    caption_key: str = "txt"  # alt-text
    recaption_key: str = "llava_caption"  # the re-caption the decoder predicts ("" = use the alt-text)
    shuffle_buffer: int = 250_000  # records shuffled across, per host
    # shards read at once (interleaved) and shuffled together; where every shard's record count is known (an index),
    # a resume starts at its window without reading the windows before it
    shard_window: int = 16
    seed: int = 0  # the data order's and the augmentations' seed
    epoch_size: int = 1_281_167  # samples per "epoch" when a stage counts epochs (ImageNet-1k's train split)
    color_jitter: float = 0.4  # strength; 0 = off (p 0.8, grayscale p 0.2, as OpenVision; applied on the device)
    crop_min_area: float = 0.4  # random-resized-crop area range [crop_min_area, 1]
    max_bad_fraction: float = 0.01  # stop with an error naming the shard past this fraction of bad samples
    # evaluation's resize: ours (as training's), or open_clip's eval transform exactly (PIL's bicubic, torchvision's
    # sizes and crop), for models trained with it
    eval_resize: Literal["bilinear", "pil_bicubic"] = "bilinear"
    # the bilinear resizes (training's and evaluation's): antialiased where they shrink by more than 2x, or always
    # (OpenVision's inception_crop and resize_small)
    antialias: Literal["beyond_2x", "always"] = "beyond_2x"
    # a JPEG crop decoded at 1/2-1/8 scale where that still covers the stage's resolution (cheap low-resolution
    # stages); false: every image decoded whole, then cropped (OpenVision's)
    scaled_decode: bool = True
    # several sources in one stream, each sample drawn from source i with probability weight_i / sum (data.train
    # stays empty); resumable like one source
    mixture: tuple[Mix, ...] = ()

    def sources(self) -> tuple[Source, ...]:
        """The training sources, resolved (one without a mixture)."""
        if not self.mixture:
            return (Source("data", **{k: getattr(self, k) for k in SOURCE_KEYS}),)
        resolved = []
        for i, mix in enumerate(self.mixture):
            own = frozenset(k for k in SOURCE_KEYS if getattr(mix, k))
            values = {k: getattr(mix if k in own else self, k) for k in SOURCE_KEYS}
            resolved.append(Source(f"data.mixture[{i}]", weight=mix.weight, own=own, **values))
        return tuple(resolved)


@dataclass(frozen=True)
class Optimizer:
    b1: float = 0.9  # AdamW's first-moment decay
    b2: float = 0.95  # AdamW's second-moment decay
    mu_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # the first moment as stored
    weight_decay: float = 0.2  # decoupled, on kernels only
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass(frozen=True)
class Loss:
    contrastive: Literal["softmax", "sigmoid"] = "softmax"  # CLIP's softmax loss, or SigLIP's sigmoid loss
    contrastive_weight: float = 1.0  # the contrastive loss's weight in the total
    caption_weight: float = 2.0  # used when model.decoder is set
    # OpenVision: the image is contrasted with its alt-text and, as a second text, with one sentence of its
    # re-caption (data.recaption_key), drawn at random; the two contrastive losses are averaged
    contrast_recaption: bool = False
    temperature_init: float = 1 / 0.07  # softmax: learned, clamped to max_temperature; sigmoid: 10 with bias -10
    max_temperature: float = 100.0  # softmax: the learned temperature's upper clamp


@dataclass(frozen=True)
class Mesh:
    data: int = -1  # -1 = the devices the other axes leave
    fsdp: int = 1  # devices each parameter and optimizer state is sharded over (FSDP)
    tensor: int = 1  # devices each layer's matmuls are split over (tensor parallelism)


@dataclass(frozen=True)
class Checkpoint:
    every_steps: int = 1000  # steps between checkpoints (a stage's checkpoint_every overrides it)
    keep: int = 3  # latest checkpoints kept; each stage's final one is kept as well


@dataclass(frozen=True)
class Log:
    every_steps: int = 50  # metrics (JSONL, TensorBoard, console) every this many steps; averaged over them
    # Weights & Biases (the `wandb` extra), from host 0: the same scalars as TensorBoard plus each eval's table
    wandb_project: str = ""  # "" = off
    wandb_entity: str = ""  # "" = the API key's default entity
    wandb_name: str = ""  # the run's display name; "" = the workdir's last path component


@dataclass(frozen=True)
class Stage:
    name: str  # names its checkpoints and metrics (unique in the recipe)
    # image side in pixels, at least one patch; the patch grid is resolution // patch (a stride-patch convolution
    # without padding, as open_clip's and big_vision's): 384 px at patch 14 is 27 x 27 patches, the last 6 pixel rows
    # and columns unused
    resolution: int
    global_batch: int  # images per step over all devices and hosts
    peak_lr: float  # the learning rate after warm-up (then cosine decay to 0 over the stage)
    samples: int = 0  # how long, in samples ...
    epochs: float = 0.0  # ... or in epochs of data.epoch_size (exactly one of the two)
    warmup_steps: int = 0  # linear warm-up from 0 to peak_lr, in steps ...
    # ... or in epochs of data.epoch_size, as OpenVision counts it (vitual_warmup_epoch: epochs x 1,281,167 samples //
    # global_batch steps); at most one of the two
    warmup_epochs: float = 0.0
    eval_every: int = 0  # steps; 0 = only at the end of the stage
    checkpoint_every: int = 0  # steps; 0 = checkpoint.every_steps
    grad_accum: int = 1  # micro-batches per step
    patch_keep: float = 1.0  # CLIPA-style patch dropout: fraction of patches kept (1 = none dropped)
    init_from: str = ""  # start from the params `python -m trainer.convert import` wrote here, not the previous stage's


@dataclass(frozen=True)
class Eval:
    kind: Literal["zeroshot", "retrieval"]  # zero-shot classification, or image-text retrieval
    name: str  # names its metrics (`NAME/top1`, `NAME/i2t_r@1`, ...)
    path: str = ""  # the eval data (a TFRecord glob, an image folder, a Karpathy-split JSON, ...)
    classnames: str = ""  # zero-shot: a class-names file ("" = ImageNet's, shipped)
    templates: str = ""  # zero-shot: a prompt-templates file ("" = CLIP's 80, shipped)
    batch: int = 256  # images per evaluation batch


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    model: Model = field(default_factory=Model)
    text: Text = field(default_factory=Text)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    loss: Loss = field(default_factory=Loss)
    mesh: Mesh = field(default_factory=Mesh)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    log: Log = field(default_factory=Log)
    evals: tuple[Eval, ...] = ()
    # Where the run keeps its checkpoints, metrics and TensorBoard files when neither `python -m trainer --workdir`
    # nor `tpuctl run --workdir` says (a bucket, for a pod: every worker must see it)
    workdir: str = ""
    # The persistent XLA compilation cache, shared by every host and every restart (gs:// included): "" = a
    # compile_cache folder next to the workdir, "off" = none. `python -m trainer --compile-cache` overrides it.
    compile_cache: str = ""

    def stage_samples(self, stage: Stage) -> int:
        return stage.samples or round(stage.epochs * self.data.epoch_size)

    def stage_steps(self, stage: Stage) -> int:
        return -(-self.stage_samples(stage) // stage.global_batch)

    def global_step(self, index: int, step: int) -> int:
        """Steps over all stages: stage `index`'s step `step`."""
        return sum(self.stage_steps(s) for s in self.stages[:index]) + step

    def named_paths(self) -> list[tuple[str, str, str]]:
        """(key, value, kind) of everything the recipe reads: kind "glob" (comma-separated paths or globs), "file",
        "tfds" (a TFDS builder directory) or "converted" (a directory `python -m trainer.convert import` wrote)."""
        found = []
        if self.data.source != "synthetic" or self.data.mixture:
            for source in self.data.sources():
                found.append((source.key("train"), source.train, "tfds" if source.source == "tfds" else "glob"))
        if self.text.vocab:
            found.append(("text.vocab", self.text.vocab, "file"))
        for index, spec in enumerate(self.evals):
            key = f"evals[{index}]"
            found.append((f"{key}.path", spec.path, "glob" if spec.kind == "zeroshot" else "file"))
            found += [(f"{key}.{name}", getattr(spec, name), "file") for name in ("classnames", "templates")]
        for index, stage in enumerate(self.stages):
            found.append((f"stages[{index}].init_from", stage.init_from, "converted"))
        return [(key, value, kind) for key, value, kind in found if value]


# --- loading ------------------------------------------------------------------------------------------------


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override (`key=value` strings) and validate a recipe file. A problem with a value a `--set` gave is
    blamed on that `--set`, not on the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:  # also catches a key set twice in the file
        raise RecipeError(f"recipe {path}: {e}") from None
    apply_overrides(raw, overrides)
    try:
        return from_dict(raw)
    except RecipeError as e:
        blamed = _override_of(str(e), overrides)
        if blamed is None:
            raise
        raise RecipeError(f"--set {blamed}: {e}") from None


def _override_of(message: str, overrides: typing.Sequence[str]) -> str | None:
    """The `--set` item whose key the message names first (`stages[1].resolution = ...` <- stages.1.resolution=...)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        named = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)  # stages.1.resolution -> stages[1].resolution
        if message.startswith((f"{named} ", f"{named}:", f"{named} =")):
            return item
    return None


def from_dict(raw: dict[str, Any]) -> Recipe:
    recipe = _warmup_in_steps(_build(Recipe, raw, ""))
    validate(recipe)
    return recipe


def _warmup_in_steps(r: Recipe) -> Recipe:
    """Each stage's warmup_epochs as warmup_steps (OpenVision's count: warm-up samples // global batch)."""
    stages = []
    for i, s in enumerate(r.stages):
        if s.warmup_epochs and s.warmup_steps:
            raise RecipeError(
                f"stages[{i}] sets both warmup_steps = {s.warmup_steps} and warmup_epochs = {s.warmup_epochs:g}: keep"
                f" one (--set stages.{i}.warmup_steps=0 clears the steps)"
            )
        if s.warmup_epochs < 0:
            raise RecipeError(f"stages[{i}].warmup_epochs = {s.warmup_epochs} must be at least 0")
        if s.warmup_epochs and s.global_batch > 0:
            steps = int(s.warmup_epochs * r.data.epoch_size // s.global_batch)
            s = dataclasses.replace(s, warmup_steps=steps, warmup_epochs=0.0)  # so that recipe.json reads back
        stages.append(s)
    return dataclasses.replace(r, stages=tuple(stages))


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> None:
    """Apply `a.b=value` / `stages.1.key=value` overrides in place; the value is read as TOML (else a string)."""
    seen: set[str] = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--set {item!r} is not key=value (e.g. --set stages.0.global_batch=256)")
        if key in seen:
            raise RecipeError(f"--set {key} is given twice")
        seen.add(key)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: a string
        *parents, last = key.split(".")
        node: Any = raw
        for i, part in enumerate(parents):
            node = _child(node, part, ".".join(parents[: i + 1]))
        if isinstance(node, list):
            raise RecipeError(f"--set {key}: name a key inside {'.'.join(parents)}[{last}], e.g. {key}.name=...")
        node[last] = value


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise RecipeError(f"--set {where}: there are {len(node)} entries (0-{len(node) - 1})")
        return node[int(part)]
    return node.setdefault(part, {})


def _build(cls: type, raw: Any, where: str) -> Any:
    """A dataclass from a TOML table, field by field, naming the key of any problem."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'the recipe'} must be a table, not {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = _join(where, unknown[0])
        raise RecipeError(f"unknown key {key} (known here: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in raw:
            values[name] = _convert(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{key} is missing")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is tuple:  # tuple[X, ...]: an array of tables
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be an array ([[{key}]] tables), not {_show(value)}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key} = {_show(value)} is not one of {', '.join(map(_show, args))}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint not in (int, float, str, bool):
        raise AssertionError(f"unsupported schema type {hint} for {key}")
    if type(value) is not hint:
        raise RecipeError(f"{key} = {_show(value)} must be {_type_name(hint)}")
    return value


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# --- validation ---------------------------------------------------------------------------------------------


def validate(r: Recipe) -> None:
    """Impossible values, one line each, naming the key."""
    m = r.model
    match = re.fullmatch(r"([A-Za-z0-9]+)/(\d+)", m.image)
    if not match or match.group(1) not in IMAGE_VARIANTS or int(match.group(2)) not in PATCH_SIZES:
        raise RecipeError(
            f'model.image = "{m.image}" is not VARIANT/PATCH with VARIANT in {", ".join(IMAGE_VARIANTS)} and PATCH in'
            f' {", ".join(map(str, PATCH_SIZES))} (e.g. "B/16")'
        )
    for key, variant in (("model.text", m.text), ("model.decoder", m.decoder)):
        if variant and variant not in TEXT_VARIANTS:
            raise RecipeError(f'{key} = "{variant}" is not one of {", ".join(TEXT_VARIANTS)}')
    _positive(
        [
            ("model.embed_dim", m.embed_dim, 0),
            ("model.image_depth", m.image_depth, 0),
            ("model.text_depth", m.text_depth, 0),
            ("text.context_length", r.text.context_length, 1),
            ("text.vocab_rows", r.text.vocab_rows, 3),
            ("text.caption_length", r.text.caption_length, 1),
            ("data.shuffle_buffer", r.data.shuffle_buffer, 1),
            ("data.shard_window", r.data.shard_window, 1),
            ("data.epoch_size", r.data.epoch_size, 1),
            ("checkpoint.every_steps", r.checkpoint.every_steps, 1),
            ("checkpoint.keep", r.checkpoint.keep, 1),
            ("log.every_steps", r.log.every_steps, 1),
        ]
    )
    towers = [key for key in ("image_remat", "text_remat", "decoder_remat") if getattr(m, key)]
    if m.remat == "auto" and towers:
        raise RecipeError(
            f'model.remat = "auto" chooses every tower\'s, and model.{towers[0]} = "{getattr(m, towers[0])}" sets one:'
            " keep one of them"
        )
    if not 0 < m.norm_eps < 1:
        raise RecipeError(f"model.norm_eps = {m.norm_eps} must be in (0, 1)")
    if m.text_pooling == "argmax" and r.text.tokenizer != "clip_bpe":
        raise RecipeError(
            f'model.text_pooling = "argmax" pools at the highest token id, CLIP BPE\'s end of text: text.tokenizer is'
            f' "{r.text.tokenizer}", set it to "clip_bpe" or use "last"'
        )
    if r.text.row != "eos" and r.text.tokenizer != "bert_wordpiece":
        raise RecipeError(f'text.row = "{r.text.row}" is a WordPiece layout: text.tokenizer = "clip_bpe" has its own')
    if r.text.row == "bos_eos_cls" and r.text.context_length < 4:
        raise RecipeError(
            f"text.context_length = {r.text.context_length} leaves no room for words between [bos], [eos] and [CLS]"
        )
    for key, value in (
        ("data.crop_min_area", r.data.crop_min_area),
        ("data.max_bad_fraction", r.data.max_bad_fraction),
    ):
        if not 0 <= value <= 1:
            raise RecipeError(f"{key} = {value} must be between 0 and 1")
    _validate_log(r.log)
    _validate_data(r.data)
    for name in ("data", "fsdp", "tensor"):
        size = getattr(r.mesh, name)
        if size == 0 or size < -1:
            raise RecipeError(f"mesh.{name} = {size} must be a positive size, or -1 for the devices left")
    if [getattr(r.mesh, n) for n in ("data", "fsdp", "tensor")].count(-1) > 1:
        raise RecipeError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if not r.stages:
        raise RecipeError("the recipe has no [[stages]]")
    names = set()
    for i, s in enumerate(r.stages):
        _validate_stage(r, s, f"stages[{i}]")
        if s.name in names:
            raise RecipeError(f'stages[{i}].name = "{s.name}" is used by an earlier stage')
        names.add(s.name)


def _validate_data(d: Data) -> None:
    """The training sources: each names its files, weights are positive, a mixture is not also given data.train."""
    if not d.mixture:
        if d.source == "synthetic":
            return
        if not d.train:
            raise RecipeError(f'data.train is empty: data.source = "{d.source}" needs the training files')
    elif d.train:
        raise RecipeError(
            f'data.train = "{d.train}" is set as well as [[data.mixture]]: with a mixture, each entry names its own'
            " train (leave data.train empty)"
        )
    for s in d.sources():
        _validate_source(s)


def _validate_source(s: Source) -> None:
    if s.source == "synthetic":
        raise RecipeError(
            f'{s.key("source")} = "synthetic" cannot be mixed: set {s.entry}.source (or data.source) to tfrecord,'
            " webdataset or tfds"
        )
    if not s.train:
        raise RecipeError(f"{s.entry}.train is empty: name the source's files")
    if not (0 < s.weight < float("inf")):
        raise RecipeError(f"{s.entry}.weight = {s.weight} must be more than 0")
    for name in ("image_key", "caption_key"):
        if not getattr(s, name) and not (name == "image_key" and s.source == "webdataset"):
            raise RecipeError(f"{s.key(name)} is empty: name the records' feature")
    if s.source != "tfds":
        return
    if not re.fullmatch(r"[\w-]+(\+[\w-]+)*", s.split):
        raise RecipeError(
            f'{s.key("split")} = "{s.split}" must name whole TFDS splits ("train", or "train+validation"): slices and'
            " percentages are not supported"
        )
    if any(c in s.train for c in ",*?["):
        raise RecipeError(
            f'{s.key("train")} = "{s.train}" must be one TFDS builder directory (the one holding'
            " dataset_info.json), not a list or a glob; mix several with [[data.mixture]]"
        )


def _validate_log(log: Log) -> None:
    bad = [c for c in "/\\#?%:" if c in log.wandb_project]  # what W&B refuses in a project name
    if bad:
        raise RecipeError(f'log.wandb_project = "{log.wandb_project}" must not contain {" ".join(bad)}')
    for key, value in (("log.wandb_entity", log.wandb_entity), ("log.wandb_name", log.wandb_name)):
        if value and not log.wandb_project:
            raise RecipeError(f'{key} = "{value}" is set but log.wandb_project is empty: W&B is off without a project')


def _validate_stage(r: Recipe, s: Stage, key: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name):
        raise RecipeError(f'{key}.name = "{s.name}" must be letters, digits, _ . - (it names a directory)')
    patch = r.model.patch
    if s.resolution < patch:
        raise RecipeError(
            f"{key}.resolution = {s.resolution} is smaller than the patch size {patch}"
            f' of model.image = "{r.model.image}": at least {patch} px'
        )
    if s.samples > 0 and s.epochs > 0:
        dotted = key.replace("[", ".").rstrip("]")
        raise RecipeError(
            f"{key} sets both samples = {s.samples} and epochs = {s.epochs:g}: keep one (--set {dotted}.samples=0"
            f" clears the samples)"
        )
    if not (s.samples > 0 or s.epochs > 0):
        raise RecipeError(f"{key} needs one of samples or epochs (> 0)")
    _positive([(f"{key}.global_batch", s.global_batch, 1), (f"{key}.grad_accum", s.grad_accum, 1)])
    _positive([(f"{key}.warmup_steps", s.warmup_steps, 0), (f"{key}.eval_every", s.eval_every, 0)])
    _positive([(f"{key}.checkpoint_every", s.checkpoint_every, 0)])
    if s.global_batch % s.grad_accum:
        raise RecipeError(
            f"{key}.global_batch = {s.global_batch} is not divisible by {key}.grad_accum = {s.grad_accum}"
        )
    if not s.peak_lr > 0:
        raise RecipeError(f"{key}.peak_lr = {s.peak_lr} must be more than 0")
    if not 0 < s.patch_keep <= 1:
        raise RecipeError(f"{key}.patch_keep = {s.patch_keep} must be in (0, 1]")
    if s.warmup_steps > r.stage_steps(s):
        raise RecipeError(f"{key}.warmup_steps = {s.warmup_steps} is longer than the stage ({r.stage_steps(s)} steps)")


def _positive(checks: list[tuple[str, int, int]]) -> None:
    for key, value, least in checks:
        if value < least:
            raise RecipeError(f"{key} = {value} must be at least {least}")


def check_devices(r: Recipe, device_count: int, process_count: int = 1) -> None:
    """What depends on the machine: each stage's batch splits evenly over devices and hosts."""
    for i, s in enumerate(r.stages):
        micro = s.global_batch // s.grad_accum
        if micro % device_count:
            raise RecipeError(
                f"stages[{i}].global_batch = {s.global_batch} (/ grad_accum {s.grad_accum} = {micro}) is not divisible"
                f" by {device_count} devices"
            )
        if micro % process_count:
            raise RecipeError(f"stages[{i}].global_batch = {s.global_batch} is not divisible by {process_count} hosts")
