"""open_clip parity, measured: random-weight open_clip models imported with `python -m trainer.convert`, their
embeddings against open_clip's (fp32, CPU), the export loaded back into open_clip, and the eval preprocessing against
open_clip's transform on real photos. Prints a table (benchmarks/RESULTS.md records it).

    python benchmarks/parity_openclip.py [--models ViT-B-16,ViT-B-16-quickgelu,ViT-L-14-CLIPA,ViT-H-14]
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import open_clip
import torch
from click.testing import CliRunner
from PIL import Image
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from sklearn.datasets import images as sample_images

from trainer import convert, pretrained
from trainer.data import preprocess
from trainer.data.tfsetup import tf
from trainer.models.clip import build, pixels_to_model_range

OURS = {"ViT-B-16": "B/16", "ViT-B-16-quickgelu": "B/16", "ViT-L-14-CLIPA": "L/14", "ViT-H-14": "H/14"}


def cli(*args: str) -> None:
    result = CliRunner().invoke(convert.main, list(args))
    assert result.exit_code == 0, result.output


def model_errors(name: str, work: Path) -> dict[str, float | str]:
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()
    with torch.no_grad():  # open_clip zero-initialises biases and LayerNorms: randomise them too, so a mix-up shows
        for key, p in reference.named_parameters():
            if key.endswith("bias") or "ln" in key or key == "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    hub = work / name
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, hub / "open_clip_model.safetensors")
    (hub / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": {}})
    )
    cli("import", str(hub / "open_clip_model.safetensors"), "--model", OURS[name], "--out", str(work / "ours"))
    settings = pretrained.read_settings(work / "ours")
    settings["model"]["dtype"] = "float32"
    model = build(pretrained.recipe_from_settings(settings))
    params = pretrained.restore_numpy(work / "ours")
    rng = np.random.default_rng(0)
    r, length, rows = settings["resolution"], settings["text"]["context_length"], settings["text"]["vocab_rows"]
    pixels = rng.integers(0, 256, (4, r, r, 3), dtype=np.uint8)
    tokens = rng.integers(1, rows - 1, (4, length)).astype(np.int32)
    tokens[:, 9], tokens[:, 10:] = rows - 1, 0
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs_image = reference.encode_image((x - mean) / std, normalize=True).numpy()
        theirs_text = reference.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
    ours_image = np.asarray(model.apply({"params": params}, jnp.asarray(pixels), method=model.encode_image))
    ours_text = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), method=model.encode_text))
    cli("export", str(work / "ours"), "--out", str(work / "back" / "open_clip_model.safetensors"))
    back = open_clip.create_model(f"local-dir:{work / 'back'}").eval()
    with torch.no_grad():
        back_image = back.encode_image((x - mean) / std, normalize=True).numpy()
        back_text = back.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    return {
        "pooling": settings["model"]["pooling"],
        "image": rel(ours_image, theirs_image),
        "text": rel(ours_text, theirs_text),
        "export": max(np.abs(back_image - theirs_image).max(), np.abs(back_text - theirs_text).max()),
    }


def preprocessing_error(resolution: int) -> float:
    worst = 0.0
    transform = open_clip.image_transform(resolution, is_train=False)
    for name in ("china.jpg", "flower.jpg"):
        encoded = (importlib.resources.files(sample_images) / name).read_bytes()
        theirs = transform(Image.open(io.BytesIO(encoded))).numpy().transpose(1, 2, 0)
        pixels = preprocess.eval_image(preprocess.decode_accurately(tf.constant(encoded)), resolution, "pil_bicubic")
        worst = max(worst, float(np.abs(np.asarray(pixels_to_model_range(pixels.numpy(), "openai")) - theirs).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="ViT-B-16,ViT-B-16-quickgelu,ViT-L-14-CLIPA,ViT-H-14")
    args = parser.parse_args()
    table = Table(title="open_clip parity (fp32, CPU): relative error of L2-normalised embeddings")
    for column in ("open_clip model", "ours", "pooling", "image rel. err", "text rel. err", "export max abs diff"):
        table.add_column(column)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as work:
            e = model_errors(name, Path(work))
        table.add_row(
            name, OURS[name], str(e["pooling"]), f"{e['image']:.2e}", f"{e['text']:.2e}", f"{e['export']:.1e}"
        )
    Console(width=150).print(table)
    prep = Table(title="eval preprocessing vs open_clip's transform (china.jpg, flower.jpg; normalised values)")
    prep.add_column("resolution")
    prep.add_column("max abs error")
    for resolution in (224, 336):
        prep.add_row(str(resolution), f"{preprocessing_error(resolution):.2e}")
    Console(width=150).print(prep)


if __name__ == "__main__":
    main()
