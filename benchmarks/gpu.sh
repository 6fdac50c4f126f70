#!/usr/bin/env bash
# Issue 6's measurement in ONE device call: our B/16, L/14 and decoder steps and open_clip's (torch.compile) on the
# same GPU, then the levers one at a time; a table on stdout, gpu.md + gpu.json in $OUT (paste gpu.md into
# benchmarks/RESULTS.md).
#
# The device image has jax (CUDA), flax, optax, orbax, torch, timm and click; it cannot reach PyPI, so open_clip and
# its two pure-Python needs travel as wheels in .whl/ (ignored by git). Once, here:
#     benchmarks/gpu.sh --fetch-wheels
# then through the device tool: command `bash benchmarks/gpu.sh`, carry [".whl"], timeout_s 600.
# Locally, to check the script on the CPU with tiny models: `bash benchmarks/gpu.sh --quick` (needs torch and
# open_clip in TORCH_PYTHON's environment).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
    exit 0
fi

if [[ "${1:-}" == "--quick" ]]; then
    exec "${JAX_PYTHON:-.venv/bin/python}" benchmarks/gpu_compare.py --quick --out "${OUT:-gpu-out}" \
        --torch-python "${TORCH_PYTHON:-python3}" --jax-python "${JAX_PYTHON:-.venv/bin/python}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c 'import jax, torch, open_clip; print("jax", jax.__version__, jax.devices()[0].device_kind, "| torch", torch.__version__, "| open_clip", open_clip.__version__)'
export PYTHONUNBUFFERED=1
# ~9 minutes of runs inside the 10-minute call; whatever does not fit is listed as skipped
# (arguments pass through: e.g. `bash benchmarks/gpu.sh --only lever` for the levers and their baseline)
python3 benchmarks/gpu_compare.py --out "${OUT:-gpu-out}" --budget "${BUDGET_S:-500}" --per-run 240 "$@"
