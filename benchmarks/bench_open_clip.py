"""The PyTorch reference for trainer.bench: open_clip's training step, timed the same way.

Builds an open_clip CLIP model with random weights (nothing is downloaded) and times the step open_clip's own training
loop runs (open_clip_train/train.py): zero_grad, forward and ClipLoss under bf16 autocast (amp_bf16), backward, AdamW
step, logit_scale clamp. One fixed random batch (images and token ids) lives on the device; warm-up steps are untimed
(the first compiles with --compile), then the median of the timed steps is reported with images/s, model TFLOP/s and
MFU = 3 x forward FLOPs per step / step time / the device's dense bf16 peak (trainer.hardware; none on CPU). Forward
FLOPs are counted once by torch.utils.flop_counter on the uncompiled model, with attention on the math backend so that
its matmuls are counted on every device. A table for people, --json for scripts. Needs torch and open_clip_torch, not
jax or tensorflow:

    python benchmarks/bench_open_clip.py --model ViT-B-16 --res 224 --batch 256 --compile --json
    python benchmarks/bench_open_clip.py --model-config /tmp/tiny.json --res 32 --batch 8 --device cpu --eager
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere: trainer/ is a sibling folder
    sys.path.insert(0, str(ROOT))

from trainer.bench import show  # noqa: E402  (click and rich: jax only inside its measure())
from trainer.errors import UserError  # noqa: E402  (click only: no jax)
from trainer.hardware import peak_flops  # noqa: E402  (no imports at all)


def register_config(path: str) -> str:
    """Register an open_clip model-config JSON file; its name is the file's stem."""
    import open_clip

    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--model-config {path}: {e}") from None
    if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"--model-config {path}: needs the keys embed_dim, vision_cfg and text_cfg")
    open_clip.add_model_config(path)
    return Path(path).stem


def build(options: dict[str, Any], device: Any) -> Any:
    import open_clip

    name = options["model"]
    if open_clip.get_model_config(name) is None:
        raise UserError(f"unknown open_clip model {name!r} (open_clip.list_models() names them; or --model-config)")
    try:
        model = open_clip.create_model(name, pretrained=None, force_image_size=options["res"], output_dict=True)
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as e:
        raise UserError(f"cannot build {name!r} at {options['res']} px: {e}") from None
    return model.to(device).train()


def optimizer_for(model: Any, device: Any) -> Any:
    """AdamW as open_clip_train/main.py builds it: no weight decay on gains, biases and logit_scale."""
    import torch

    def exclude(n: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
    ]
    # betas and eps: open_clip's defaults for ViTs (open_clip_train/params.py)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def forward_flops(model: Any, images: Any, texts: Any, autocast: Any) -> int:
    """Forward FLOPs of one batch through the model (not the loss), counted on the uncompiled model."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # train mode (no nn.MultiheadAttention fast path); math attention: bmm's, counted on any device (the counter has
    # no formula for CPU's fused kernel)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), autocast(), counter:
        model(images, texts)
    return int(counter.get_total_flops())


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(options: dict[str, Any]) -> dict[str, Any]:
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    if options["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device(options["device"])
    if device.type == "cuda":  # as open_clip_train/main.py sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    torch.manual_seed(0)
    model = build(options, device)
    optimizer = optimizer_for(model, device)
    loss_fn = ClipLoss()
    batch = options["batch"]
    images = torch.randn(batch, 3, options["res"], options["res"], device=device)
    texts = torch.randint(0, model.vocab_size, (batch, model.context_length), device=device)

    def autocast() -> Any:
        if options["precision"] == "amp_bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    fwd_flops = forward_flops(model, images, texts, autocast)
    params = sum(p.numel() for p in model.parameters())
    net = torch.compile(model) if options["compile"] else model

    def step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = net(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    compile_start = time.perf_counter()
    loss = step()  # the first compiles
    first_loss = float(loss)
    for _ in range(options["warmup"] - 1):
        loss = step()
    sync()
    compile_and_warmup_s = time.perf_counter() - compile_start
    times = []
    for _ in range(options["steps"]):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    train_flops = 3 * fwd_flops
    return {
        "framework": "open_clip",
        "model": options["model"],
        "res": options["res"],
        "batch": batch,
        "context_length": model.context_length,
        "params": params,
        "precision": options["precision"],
        "compiled": options["compile"],
        "device": device_name(device),
        "step_s": step_s,
        "step_s_min": min(times),
        "img_per_s": batch / step_s,
        "fwd_flops_per_step": fwd_flops,
        "tflops": train_flops / step_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": train_flops / step_s / peak if peak else None,
        "compile_and_warmup_s": compile_and_warmup_s,
        "loss_first": first_loss,
        "loss": float(loss),
        "steps": options["steps"],
        "warmup": options["warmup"],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }


ROWS = (
    ("model", lambda r: f"{r['model']} ({r['params'] / 1e6:.1f} M parameters)"),
    ("resolution / context", lambda r: f"{r['res']} px / {r['context_length']} tokens"),
    ("batch", lambda r: str(r["batch"])),
    ("precision / compiled", lambda r: f"{r['precision']} / {'torch.compile' if r['compiled'] else 'eager'}"),
    ("device", lambda r: r["device"]),
    ("step time (median)", lambda r: f"{1000 * r['step_s']:.1f} ms"),
    ("images/s", lambda r: f"{r['img_per_s']:.1f}"),
    ("forward GFLOPs per step", lambda r: f"{r['fwd_flops_per_step'] / 1e9:.1f}"),
    ("model TFLOP/s", lambda r: f"{r['tflops']:.2f}"),
    ("MFU", lambda r: "- (peak unknown)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
    ("compile + warm-up", lambda r: f"{r['compile_and_warmup_s']:.1f} s"),
    ("loss (first -> last)", lambda r: f"{r['loss_first']:.4f} -> {r['loss']:.4f}"),
    ("torch / open_clip", lambda r: f"{r['torch']} / {r['open_clip']}"),
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip model config name.")
@click.option(
    "--model-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="An open_clip model-config JSON to register and use (its file stem becomes --model).",
)
@click.option("--res", default=224, show_default=True, help="Image resolution (force_image_size).")
@click.option("--batch", default=256, show_default=True, help="Batch.")
@click.option("--steps", default=10, show_default=True, help="Timed steps (the median is reported).")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first (the first compiles).")
@click.option("--compile/--eager", "compile", default=False, show_default=True, help="torch.compile the model.")
@click.option("--precision", type=click.Choice(["amp_bf16", "fp32"]), default="amp_bf16", show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def main(as_json: bool, model_config: str | None, **options: Any) -> None:
    """Time open_clip's training step for one model at one resolution and batch."""
    if options["steps"] < 1 or options["warmup"] < 1:
        raise UserError("--steps and --warmup must be at least 1")
    if options["batch"] < 1 or options["res"] < 1:
        raise UserError("--batch and --res must be at least 1")
    if model_config is not None:
        options["model"] = register_config(model_config)
    result = measure(options)
    if as_json:
        click.echo(json.dumps(result))
    else:
        show(result, ROWS, "open_clip step benchmark")


if __name__ == "__main__":
    main()
