"""OpenVision's own training step and ours, compiled side by side for one TPU topology: memory and FLOPs per chip.

    python benchmarks/openvision_side_by_side.py --openvision /tmp/openvision [--type v4-256] [--per-chip 256]
        [--res 160] [--search] [--json] [--save-json FILE]

--openvision: a work tree of github.com/UCSC-VLAA/OpenVision (the folder holding src/), imported as OpenVision's
code, never edited. Its step is built as its src/main_clip.py builds it for src/configs/openvision.py and the
pre-training command of scripts/project/openvision/train.sh, with B/16 image and B text towers and its B caption
decoder (`img=B/16,txt_name=B/16,txt_decoder_name=B`, bf16 compute, f32 parameters; the config's remat='full' on
both towers, none in the decoder; its "coca" loss: the local contrastive loss of the image against both texts, plus
2 x the caption loss): the model from config.model_name, its parameter and optimizer shapes by jax.eval_shape under
its logical axis rules, its shardings (nn.logical_to_mesh on Mesh(mesh_utils.create_device_mesh((data, fsdp,
tensor)), its mesh axes), data = every device as train.sh sets it), its optax chain (src.optim.make), and update_fn
written out here as main_clip.py's (jit with its in/out shardings and donate_argnums=(0,), traced under `with mesh,
nn.logical_axis_rules(...)` as its loop calls it, with its unsafe_rbg PRNG). Its batch as its input pipeline feeds
it: uint8 images (config.cpu_unit8), token rows of 80 (two texts), caption labels and mask of 128.

Ours: trainer's own step for recipes/b16.toml (trainer.memory.train_step_args) at the same global batch and
resolution, for the towers' "dots" with the decoder's "block" (the row held to the targets), remat none, OpenVision's
choice (image and text block, decoder none), block (all three) and auto
(trainer.fitting.choose, as the plan chooses).

Both are compiled by libtpu for the type's topology on this machine (no TPU): trainer.memory.compile_memory gives
the compiler's per-chip memory (arguments: parameters, optimizer state and the batch's rows; temporaries; total:
libtpu's peak) or, where it refuses the program, what it said it needed. FLOPs: the traced program's matmuls with
every layer and remat's recomputation (trainer.models.flops.traced's count), global, per image; a shard_map's body
(OpenVision's loss, our caption loss) is traced on one device's block, so it counts once a device. "fits": the
compiler accepted it and its total is within the chip's HBM.

--search: the largest batch per chip that fits, for OpenVision and our first row (its remat held fixed), over
multiples of 8 between 8 and 1024: a bisection, each probe one compile (a refusal or a total over HBM: does not
fit), its first bracket narrowed by the measurement at --per-chip. (Interpolating the totals was tried and dropped:
near the limit libtpu trades its schedule for memory, the total stays flat at ~28 GiB from 256 to 400 images a chip
for OpenVision, so the line through two totals aims low, and a probe that fits costs 5-8 minutes here where a
refusal costs 1.5-2.)

Each compile runs in a process of its own (--worker, internal), one at a time: OpenVision's compile near a chip's
limit takes 10 GB and more of this machine's memory, which a long run in one process would pile up. --cache FILE
keeps each compile's figures as they come (keyed by the code compiled, the versions, the type, resolution, remat
and batch), so that a run cut short goes on where it stopped.

Shims for OpenVision's code on this venv's jax (0.10), applied at run time, none changing its math:
  1. jax.tree_flatten = jax.tree_util.tree_flatten (removed from jax; src/optim/build_optax.py calls it);
  2. its loss's shard_map (src/losses/common.py) gives out_specs P('batch', None) for a (1,) per-device value:
     P('batch') as jax 0.10 requires (jax's checks refuse a spec longer than the value's rank);
  3. jax.device_count() returns the topology's device count while its step is traced (its loss reshapes the
     all_gather by it; on this CPU machine jax.device_count() counts the CPU, on the pod it is the mesh's size);
  4. its loss's print() lines go to stderr while traced (so that --json's stdout stays one JSON object).
Not reproduced: LIBTPU_INIT_ARGS=--xla_tpu_spmd_rng_bit_generator_unsafe=true (main_clip sets it on the pod): no op
in this step draws random bits (dropout, drop-path and masking are 0), so the compiled program does not change.
tensorflow.io.gfile imports as it is (the venv has tensorflow): no stub. Packages: ml_collections (pip install
ml_collections; OpenVision's configs import it); the rest (flax, optax, einops, absl-py, tensorflow, orbax) are
already the venv's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere: trainer/ is a sibling folder
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
STEP = 8  # the search's grain: batches per chip in multiples of 8
TOP = 1024  # and at most this many
RECIPE = ROOT / "recipes" / "b16.toml"
# (row name, (model.image_remat, text_remat, decoder_remat), searched with --search); "auto" is the plan's choice.
# The first is the one held to the targets: the towers keep their matmuls' outputs, the decoder recomputes its blocks.
OURS: tuple[tuple[str, tuple[str, str, str] | None, bool], ...] = (
    ("towers dots, decoder block", ("dots", "dots", "block"), True),
    ("none", ("none", "none", "none"), False),
    ("OpenVision's (image+text block)", ("block", "block", "none"), False),
    ("block", ("block", "block", "block"), False),
    ("auto", None, False),
)


def log(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


# ---------------------------------------------------------------------------------------------------------------
# OpenVision's step


class OpenVision:
    """OpenVision's B/16 step (src/main_clip.py) for `devices` at `res` px; `args(per_chip)` its abstract arguments."""

    def __init__(self, path: Path, devices: list[Any], res: int, per_chip: int) -> None:
        import jax

        src = path / "src"
        if not (src / "main_clip.py").is_file():
            raise click.UsageError(f"--openvision {path}: no src/main_clip.py there (OpenVision's work tree)")
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        jax.tree_flatten = jax.tree_util.tree_flatten  # shim 1 (module docstring)
        with self.context_free():
            self._build(devices, res, per_chip)

    @staticmethod
    @contextlib.contextmanager
    def context_free() -> Iterator[None]:
        """OpenVision's imports and prints, quietly: its prints and deprecation warnings to stderr or away."""
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield

    def _build(self, devices: list[Any], res: int, per_chip: int) -> None:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import optax
        from flax.linen import partitioning as nn_partitioning
        from jax.experimental import mesh_utils
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        configs = importlib.import_module("src.configs.openvision")
        losses = importlib.import_module("src.losses")
        loss_module = importlib.import_module("src.losses.common")
        optim = importlib.import_module("src.optim")
        unbox = importlib.import_module("src.helpers.sharding").unbox_logicallypartioned

        # shim 2: a (1,) value per device is P('batch'), not P('batch', None), for jax 0.10's shard_map
        their_shard_map = getattr(loss_module.shard_map, "openvision_original", loss_module.shard_map)

        def shard_map(f: Any, mesh: Any, in_specs: Any, out_specs: Any, **kw: Any) -> Any:
            if out_specs == P("batch", None):
                out_specs = P("batch")
            return their_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw)

        shard_map.openvision_original = their_shard_map  # type: ignore[attr-defined]
        loss_module.shard_map = shard_map

        n = len(devices)
        global_batch = per_chip * n
        # train.sh's pre-training command (B/16 image and text, B decoder, data parallelism over every device, batch
        # 16,384 x BATCH_FACTOR, 10,000 ImageNet-epochs with 40 of warm-up) and its --config.* dtype overrides
        arg = (
            f"res={res},img=B/16,txt_name=B/16,txt_decoder_name=B,token_len=80,output_token_len=128,"
            f"batch_factor={global_batch / 16384},data_parallelism={n},fsdp_parallelism=1,tensor_parallelism=1,"
            "imagenet_epoch=10000,vitual_warmup_epoch=40,base_lr=8e-6,mask_ratio=0."
        )
        config = configs.get_config(arg)
        config.model.image.dtype = "bfloat16"
        config.model.text.dtype = "bfloat16"
        config.model.text_decoder_config.dtype = "bfloat16"
        config.model.text.param_dtype = "float32"
        self.config = config
        rules = config.sharding.logical_axis_rules
        self.rules = rules

        # main_clip.create_mesh, on the topology's devices
        grid = mesh_utils.create_device_mesh(
            [
                config.sharding.meshshape.data_parallelism,
                config.sharding.meshshape.fsdp_parallelism,
                config.sharding.meshshape.tensor_parallelism,
            ],
            devices,
        )
        mesh = Mesh(grid, config.sharding.mesh_axes)
        self.mesh = mesh
        flat_devices = grid.flatten()
        self.data_sharding = jax.tree.map(lambda p: NamedSharding(mesh, p), P(*config.sharding.data_sharding))
        repl_sharding = NamedSharding(mesh, P())

        model = importlib.import_module(f"src.models.{config.model_name}").Model(**config.get("model", {}), mesh=mesh)

        def init(rng: Any) -> Any:
            no_image = jnp.zeros(config.init_shapes[0], jnp.float32)
            no_text = jnp.zeros(config.init_shapes[1], jnp.int32)
            return model.init(rng, no_image, no_text, train=True)["params"]

        with self.prng():
            with nn_partitioning.axis_rules(rules):
                params_shape = jax.eval_shape(init, jax.random.PRNGKey(0))
            with mesh, nn_partitioning.axis_rules(rules):
                params_mesh = nn.logical_to_mesh(nn.get_partition_spec(params_shape))
            params_unboxed = unbox(params_shape)
            self.params_count = sum(p.size for p in jax.tree.leaves(params_unboxed))
            tx, _ = optim.make(
                config,
                params_unboxed,
                sched_kw=dict(total_steps=config.total_steps, batch_size=global_batch, data_size=1281167 * 10000),
            )
            with nn_partitioning.axis_rules(rules):
                opt_shape = jax.eval_shape(tx.init, params_shape)
            with mesh, nn_partitioning.axis_rules(rules):
                opt_mesh = nn.logical_to_mesh(nn.get_partition_spec(opt_shape))
            state_sharding = {
                "params": jax.tree.map(lambda p: NamedSharding(mesh, p), params_mesh),
                "opt": jax.tree.map(lambda p: NamedSharding(mesh, p), opt_mesh),
            }
            key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        self.state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            {"params": params_unboxed, "opt": unbox(opt_shape)},
            state_sharding,
        )
        self.rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl_sharding)

        # main_clip.update_fn, for its openvision config (cpu_unit8, loss_type "coca", local_loss)
        @functools.partial(
            jax.jit,
            donate_argnums=(0,),
            in_shardings=(state_sharding, self.data_sharding, repl_sharding),
            out_shardings=(state_sharding, repl_sharding),
        )
        def update_fn(train_state: Any, batch: Any, rng: Any) -> Any:
            images = batch["image"]
            labels = jnp.concatenate([batch["labels1"], batch["labels2"]], axis=0)
            if config.get("cpu_unit8", False):
                mean = jnp.asarray([0.485 * 255, 0.456 * 255, 0.406 * 255])[None, None, None, :]
                std = jnp.asarray([0.229 * 255, 0.224 * 255, 0.225 * 255])[None, None, None, :]
                images = (jnp.asarray(images, dtype=jnp.float32) - mean) / std
            step_count = optim.get_count(train_state["opt"], jittable=True)
            rng = jax.random.fold_in(rng, step_count)
            rng, _ = jax.random.split(rng, 2)

            def loss_fn(params: Any, images: Any, labels: Any) -> Any:
                zimg, ztxt, extras = model.apply(
                    {"params": params},
                    images,
                    labels,
                    train=True,
                    rngs={"dropout": rng, "drop_path": rng, "random_mask": rng},
                )
                local_img, local_txt = (zimg, ztxt) if config.get("local_loss", False) else (None, None)
                assert config.get("loss_type", "clip") == "coca"
                half = ztxt.shape[0] // 2
                ztxt_1, ztxt_2 = ztxt[:half], ztxt[half:]
                loss, extra = losses.bidirectional_contrastive_loss(
                    zimg,
                    ztxt_1,
                    ztxt_2,
                    extras["t"],
                    reduction=True,
                    local_loss=config.local_loss,
                    local_img_logits=local_img,
                    local_txt_logits=local_txt,
                    devices=flat_devices,
                )
                caption = losses.softmax_xent(
                    logits=extras["logits"],
                    labels=batch["autoreg_labels"],
                    mask=batch["cap_loss_mask"],
                    reduction=True,
                    axis=-1,
                )
                extra["clip_loss"] = loss
                extra["caption_loss"] = caption
                loss = config.get("clip_loss_weight") * loss + config.get("coca_caption_loss_weight") * caption
                return loss, {
                    "t": extras["t"],
                    "t/parameter": extras["t/parameter"],
                    "nimg": jnp.mean(extras["img/norm"]),
                    "ntxt": jnp.mean(extras["txt/norm"]),
                    **extra,
                }

            params, opt = train_state["params"], train_state["opt"]
            (loss, measurements), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
            measurements["training_loss"] = loss
            gs = jax.tree.leaves(optim.replace_frozen(config.schedule, grads, 0.0))
            measurements["l2_grads"] = jnp.sqrt(sum([jnp.vdot(g, g) for g in gs]))
            measurements["l2_params"] = jnp.sqrt(sum([jnp.vdot(p, p) for p in jax.tree.leaves(params)]))
            measurements["l2_updates"] = jnp.sqrt(sum([jnp.vdot(u, u) for u in jax.tree.leaves(updates)]))
            return {"params": params, "opt": opt}, measurements

        self.update_fn = update_fn

    @staticmethod
    @contextlib.contextmanager
    def prng() -> Iterator[None]:
        """main_clip's jax_default_prng_impl (unsafe_rbg), for its step only: ours keeps jax's default."""
        import jax

        before = jax.config.jax_default_prng_impl
        jax.config.update("jax_default_prng_impl", "unsafe_rbg")
        try:
            yield
        finally:
            jax.config.update("jax_default_prng_impl", before)

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """As main_clip's loop calls update_fn (`with mesh, nn.logical_axis_rules(...)`), with shims 3 and 4."""
        import flax.linen as nn
        import jax

        device_count = jax.device_count
        jax.device_count = lambda backend=None: self.mesh.size  # shim 3
        try:
            with self.context_free(), self.prng(), self.mesh, nn.logical_axis_rules(self.rules):
                yield
        finally:
            jax.device_count = device_count

    def args(self, per_chip: int) -> tuple[Any, Any, Any]:
        import jax
        import jax.numpy as jnp

        b, r = per_chip * self.mesh.size, self.config.init_shapes[0][1]
        tokens, caption = self.config.input.txt_token_length, 128  # train.sh's token_len and output_token_len
        shapes = {
            "image": ((b, r, r, 3), jnp.uint8),
            "labels1": ((b, tokens), jnp.int32),
            "labels2": ((b, tokens), jnp.int32),
            "autoreg_labels": ((b, caption), jnp.int32),
            "cap_loss_mask": ((b, caption), jnp.int32),
        }
        batch = {k: jax.ShapeDtypeStruct(s, d, sharding=self.data_sharding) for k, (s, d) in shapes.items()}
        return self.state, batch, self.rng

    def memory(self, per_chip: int) -> Any:
        from trainer.memory import compile_memory

        with self.tracing():
            return compile_memory(self.update_fn, *self.args(per_chip))

    def flops(self, per_chip: int) -> float:
        from trainer.models.flops import traced  # every layer, remat, a shard_map body once a device

        with self.tracing():
            return traced(self.update_fn, *self.args(per_chip))


# ---------------------------------------------------------------------------------------------------------------
# Ours


class Ours:
    """recipes/b16.toml's stage 1 at `res` px on `devices`, for a remat choice and a batch per chip."""

    def __init__(self, devices: list[Any], res: int) -> None:
        from trainer import sharding
        from trainer.recipe import load

        self.devices, self.res = devices, res
        self.mesh = sharding.make_mesh(load(RECIPE).mesh, devices)

    def recipe(self, remat: tuple[str, str, str] | None, per_chip: int) -> Any:
        from trainer.recipe import load

        sets = [f"stages.0.global_batch={per_chip * len(self.devices)}", f"stages.0.resolution={self.res}"]
        if remat is None:
            sets.append("model.remat=auto")
        else:
            sets.append("model.remat=none")  # the towers' own below (the recipe's may be "auto")
            sets += [f"model.{t}_remat={p}" for t, p in zip(("image", "text", "decoder"), remat, strict=True)]
        return load(RECIPE, sets)

    def memory(self, recipe: Any) -> Any:
        from trainer.memory import train_memory

        return train_memory(recipe, recipe.stages[0], self.mesh)

    def flops(self, recipe: Any) -> float:
        from trainer.memory import train_step_args
        from trainer.models.flops import traced

        return traced(*train_step_args(recipe, recipe.stages[0], self.mesh))


def remat_of(recipe: Any) -> tuple[str, str, str]:
    return tuple(recipe.model.tower_remat(t) for t in ("image", "text", "decoder"))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# The search


def largest_batch(probe: Callable[[int], Any], seen: dict[int, Any], hbm: int) -> tuple[int, list[int]]:
    """The largest multiple of STEP up to TOP per chip whose step fits (0: none does), by bisection, and the batches
    it probed. `seen`: batch -> figures already measured (the run's --per-chip), which narrow the first bracket
    [0, TOP + STEP] (neither end measured: 0 fits by definition, TOP + STEP is past the range)."""
    fits = lambda m: m.fits and m.total <= hbm  # noqa: E731
    lo = max([b for b, m in seen.items() if fits(m)], default=0)
    hi = min([b for b, m in seen.items() if not fits(m) and b > lo], default=TOP + STEP)
    probed: list[int] = []
    while hi - lo > STEP:
        middle = lo + (hi - lo) // 2 // STEP * STEP
        log(f"  probe {middle} per chip (between {lo} and {hi})")
        probed.append(middle)
        if fits(probe(middle)):
            lo = middle
        else:
            hi = middle
    return lo, probed


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Row:
    name: str
    remat: str
    per_chip: int
    arguments: int
    temporaries: int
    total: int
    fits: bool
    flops_per_image: float
    largest: int | None = None  # per chip, with --search
    probes: list[int] | None = None
    ratios: dict[str, float | None] | None = None  # ours against OpenVision's


@dataclasses.dataclass(frozen=True)
class Measured:
    """One compile's figures as a worker sends them back: trainer.memory.Memory's, and the traced FLOPs."""

    arguments: int
    temporaries: int
    total: int
    compiled_flops: float | None
    available: int | None
    flops: float | None  # traced, global; None where not asked for

    @property
    def fits(self) -> bool:
        return self.compiled_flops is not None


def worker(spec: dict) -> dict:
    """One compile (and with spec["flops"], the traced FLOPs) of one side's step, in this process. The parent runs
    each in a process of its own, so that a compile's memory (OpenVision's: 10 GB and more here) is given back
    before the next one starts."""
    import jax

    from trainer import tpu_types
    from trainer.plan import topology_devices

    devices = topology_devices(tpu_types.parse(spec["type"]))
    b = spec["per_chip"]
    if spec["side"] == "openvision":
        ov = OpenVision(Path(spec["openvision"]), devices, spec["res"], b)
        memory = ov.memory(b)
        flops = ov.flops(b) if spec["flops"] else None
        params = ov.params_count
    else:
        ours = Ours(devices, spec["res"])
        recipe = ours.recipe(tuple(spec["remat"]), b)  # type: ignore[arg-type]
        memory = ours.memory(recipe)
        flops = ours.flops(recipe) if spec["flops"] else None
        params = None
    return {
        **dataclasses.asdict(memory),
        "flops": flops,
        "params": params,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "jax": jax.__version__,
    }


def code_hash(root: Path, *files: Path) -> str:
    """What a cached figure was compiled from: the Python files under `root`, and `files`."""
    digest = hashlib.sha256()
    for path in [*sorted(root.rglob("*.py")), *files]:
        digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


class Compiler:
    """Each compile in a worker process, one at a time. With a cache file, each one's figures are kept there as soon
    as they are known, keyed by the code compiled (its files' hash), jax's and libtpu's versions, the type, the
    resolution, the remat and the batch: a run cut short goes on where it stopped."""

    def __init__(self, openvision: Path, accelerator_type: str, res: int, cache: Path | None) -> None:
        from importlib import metadata

        from trainer.plan import libtpu_version

        self.openvision, self.type, self.res, self.cache_path = openvision, accelerator_type, res, cache
        self.versions = [metadata.version("jax"), metadata.version("jaxlib"), libtpu_version()]
        here = Path(__file__).resolve()
        self.hashes = {
            "openvision": code_hash(openvision / "src", here),
            "ours": code_hash(ROOT / "trainer", RECIPE, here),
        }
        self.cache: dict[str, dict] = json.loads(cache.read_text()) if cache and cache.is_file() else {}
        self.info: dict[str, Any] = {}  # devices, device_kind, jax and OpenVision's parameters, from the workers

    def measure(self, side: str, remat: tuple[str, str, str] | None, per_chip: int, flops: bool = False) -> Measured:
        key = json.dumps([side, remat, per_chip, self.type, self.res, self.hashes[side], self.versions])
        hit = self.cache.get(key)
        what = "OpenVision" if side == "openvision" else f"ours, remat {'/'.join(remat or ())}"
        if hit is None or (flops and hit["flops"] is None):
            started = time.time()
            spec = {"side": side, "openvision": str(self.openvision), "type": self.type, "res": self.res}
            hit = self._spawn({**spec, "per_chip": per_chip, "remat": remat, "flops": flops})
            state = f"{hit['total'] / GIB:.2f} GiB" + ("" if hit["compiled_flops"] is not None else " (refused)")
            log(f"{what}, {per_chip} per chip: compiled in {time.time() - started:.0f} s, {state}")
            self.cache[key] = hit
            if self.cache_path:
                scratch = self.cache_path.with_name(self.cache_path.name + ".tmp")
                scratch.write_text(json.dumps(self.cache))
                scratch.replace(self.cache_path)
        else:
            log(f"{what}, {per_chip} per chip: from the cache, {hit['total'] / GIB:.2f} GiB")
        self.info.update({k: hit[k] for k in ("devices", "device_kind", "jax")})
        if hit["params"]:
            self.info["openvision_params"] = hit["params"]
        return Measured(**{f.name: hit[f.name] for f in dataclasses.fields(Measured)})

    def _spawn(self, spec: dict) -> dict:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stderr is not None
        tail: list[str] = []
        for line in process.stderr:  # the worker's progress lines; libtpu's and tensorflow's chatter is held back
            if line[:1] == "[" and line[1:3].isdigit():
                sys.stderr.write(line)
            tail = [*tail[-40:], line]
        out = process.stdout.read()
        if process.wait() != 0:
            raise click.ClickException(f"a compile failed ({spec}):\n{''.join(tail)}")
        return json.loads(out.strip().splitlines()[-1])


def run(openvision: Path, accelerator_type: str, per_chip: int, res: int, search: bool, cache: Path | None) -> dict:
    from trainer import fitting, tpu_types
    from trainer.plan import libtpu_version
    from trainer.recipe import load

    tpu = tpu_types.parse(accelerator_type)
    hbm = tpu.hbm_bytes
    compiler = Compiler(openvision, accelerator_type, res, cache)
    fits = lambda m: m.fits and m.total <= hbm  # noqa: E731
    started = time.time()
    log(f"{tpu.name}: {per_chip} images per chip at {res} px; each compile in a process of its own")

    def row(name: str, remat: str, m: Measured, n: int) -> Row:
        assert m.flops is not None
        return Row(name, remat, per_chip, m.arguments, m.temporaries, m.total, fits(m), m.flops / (per_chip * n))

    # OpenVision
    ov = compiler.measure("openvision", None, per_chip, flops=True)
    n = compiler.info["devices"]
    rows = [row("OpenVision", "image+text full, decoder none", ov, n)]
    if search:
        log("OpenVision: the largest batch per chip that fits")
        rows[0].largest, rows[0].probes = largest_batch(
            lambda b: compiler.measure("openvision", None, b), {per_chip: ov}, hbm
        )

    # Ours
    base = load(RECIPE, [f"stages.0.global_batch={per_chip * n}", f"stages.0.resolution={res}", "model.remat=auto"])
    for name, choice, searched in OURS:
        if choice is None:  # the plan's: the least recomputation that fits (trainer.fitting.choose)
            measure = lambda r: compiler.measure("ours", remat_of(r), per_chip)  # noqa: E731
            recipe, _ = fitting.choose(base, measure, fits, stage=base.stages[0])
        else:
            recipe = fitting.with_remat(base, choice)  # type: ignore[arg-type]
        remat = remat_of(recipe)
        m = compiler.measure("ours", remat, per_chip, flops=True)
        rows.append(row(f"ours, {name}", fitting.describe(recipe), m, n))
        if search and searched:
            log(f"ours, {name} ({fitting.describe(recipe)}): the largest batch per chip that fits")
            rows[-1].largest, rows[-1].probes = largest_batch(
                lambda b, r=remat: compiler.measure("ours", r, b), {per_chip: m}, hbm
            )

    first = rows[0]
    for r in rows[1:]:
        r.ratios = {
            "total_hbm": r.total / first.total,
            "largest_batch": r.largest / first.largest if r.largest is not None and first.largest else None,
            "flops_per_image": r.flops_per_image / first.flops_per_image,
        }
    log(f"done in {time.time() - started:.0f} s")
    return {
        "type": tpu.name,
        "devices": n,
        "device_kind": compiler.info["device_kind"],
        "hbm_bytes": hbm,
        "resolution": res,
        "per_chip": per_chip,
        "global_batch": per_chip * n,
        "search": search,
        "search_range": [STEP, TOP, STEP],
        "openvision": str(openvision),
        "openvision_params": compiler.info.get("openvision_params"),
        "jax": compiler.info["jax"],
        "libtpu": libtpu_version(),
        "seconds": round(time.time() - started, 1),
        "rows": [dataclasses.asdict(r) for r in rows],
        "targets": {"total_hbm": "<= 0.5", "largest_batch": ">= 1.5", "flops_per_image": "<= 1"},
    }


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"OpenVision's step and ours on {result['type']} ({result['devices']} x {result['device_kind']}, "
        f"{result['hbm_bytes'] / GIB:.3g} GiB each): {result['global_batch']:,} images at {result['resolution']} px"
    )
    table = Table(title=title)
    columns = ["step", "remat", "per chip", "params + opt", "temporaries", "total", "fits", "TFLOP / image"]
    if result["search"]:
        columns.append("largest per chip")
    columns += ["total / OV (<= 0.5)", "FLOP / OV (<= 1)"]
    if result["search"]:
        columns.append("largest / OV (>= 1.5)")
    for column in columns:
        table.add_column(column, justify="left" if column in ("step", "remat") else "right")

    def ratio(value: float | None, ok: bool | None) -> str:
        if value is None:
            return "-"
        return f"[green]{value:.2f}[/]" if ok else f"[red]{value:.2f}[/]"

    for r in result["rows"]:
        cells = [
            r["name"],
            r["remat"],
            str(r["per_chip"]),
            f"{r['arguments'] / GIB:.2f} GiB",
            f"{r['temporaries'] / GIB:.2f} GiB",
            f"{r['total'] / GIB:.2f} GiB",
            "yes" if r["fits"] else "[red]no[/]",
            f"{r['flops_per_image'] / 1e12:.4f}",
        ]
        if result["search"]:
            largest = r["largest"]
            cells.append("-" if largest is None else (f">= {largest}" if largest >= TOP else str(largest)))
        q = r["ratios"] or {}
        cells += [
            ratio(q.get("total_hbm"), q.get("total_hbm") is not None and q["total_hbm"] <= 0.5),
            ratio(q.get("flops_per_image"), q.get("flops_per_image") is not None and q["flops_per_image"] <= 1),
        ]
        if result["search"]:
            value = q.get("largest_batch")
            cells.append(ratio(value, value is not None and value >= 1.5))
        table.add_row(*cells)
    console = Console()
    console.width = max(console.width, 200)
    console.print(table)
    click.echo(f"jax {result['jax']}, libtpu {result['libtpu']}; {result['seconds']:.0f} s")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--openvision",
    "openvision",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A work tree of OpenVision's repository (holding src/).",
)
@click.option("--type", "accelerator_type", default="v4-256", show_default=True, help="The TPU type to compile for.")
@click.option("--per-chip", default=256, show_default=True, help="Images per chip (OpenVision's: 128 per TensorCore).")
@click.option("--res", default=160, show_default=True, help="Image resolution (OpenVision's stage 1: 160).")
@click.option("--search", is_flag=True, help="Also the largest batch per chip that fits (one compile a probe).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout instead of the table.")
@click.option(
    "--save-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON object to this file (one run, both forms).",
)
@click.option(
    "--cache",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep each compile's figures in this JSON file; a later run of the same code reads them back.",
)
@click.option("--worker", "worker_spec", hidden=True, help="(internal) one compile, its figures as JSON on stdout.")
def main(
    openvision: Path | None,
    accelerator_type: str,
    per_chip: int,
    res: int,
    search: bool,
    as_json: bool,
    save_json: Path | None,
    cache: Path | None,
    worker_spec: str | None,
) -> None:
    """Compile OpenVision's training step and ours for a TPU type's topology and compare memory and FLOPs."""
    # compile-only, with libtpu for the topology: nothing runs on a device (as trainer/plan.py's main)
    library = ROOT / ".libtpu" / "libtpu" / "libtpu.so"
    if library.is_file():
        os.environ.setdefault("TPU_LIBRARY_PATH", str(library))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # OpenVision imports tensorflow
    if worker_spec:
        click.echo(json.dumps(worker(json.loads(worker_spec))))
        return
    if openvision is None:
        raise click.UsageError("--openvision is required")
    if per_chip % STEP or not STEP <= per_chip <= TOP:
        raise click.UsageError(f"--per-chip: a multiple of {STEP} from {STEP} to {TOP}")
    result = run(openvision.resolve(), accelerator_type, per_chip, res, search, cache)
    if save_json:
        save_json.write_text(json.dumps(result) + "\n")
    if as_json:
        click.echo(json.dumps(result))
    else:
        show(result)


if __name__ == "__main__":
    main()
