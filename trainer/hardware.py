"""Peak dense bf16 FLOP/s of one JAX device, by device kind (for MFU). Unknown kinds (CPUs) have none: no MFU."""

from __future__ import annotations

# Substring of jax.Device.device_kind -> peak FLOP/s per device, most specific first. TPU v2/v3 devices are cores.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),
    ("TPU v2", 23e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM, dense
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None
