"""Why ``engine="svi"`` left the other engines' trajectory on CUDA (issue 18), reproduced on the CPU.

On CUDA the torch and graph engines ran fused Adam and ``engine="svi"`` Pyro's per-parameter foreach Adam;
``tests/test_lr_schedule.py::test_every_engine_follows_the_same_schedule`` then failed for svi. This script runs
that test's fit (3 epochs, cosine schedule, lr 1e-2) with the torch engine on fused Adam and the other engines
on each kernel, and prints the largest weight difference and whether it is inside that test's tolerance
(rtol 1e-5, atol 1e-6). Since the fix every engine takes ``dgc_pyro.inference.engine.adam_kernel(device)``.

    python benchmarks/adam_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_lr_schedule

import dgc_pyro.inference.engine as engine

KERNELS = {
    "fused": {"foreach": False, "fused": True},
    "foreach": {"foreach": True, "fused": None},
    "single-tensor": {"foreach": False, "fused": None},
}


def weights(name: str, kernel: dict) -> torch.Tensor:
    engine.adam_kernel = lambda device: dict(kernel)
    return test_lr_schedule._fit(name, lr_schedule="cosine")[1]


def main() -> int:
    torch.set_num_threads(1)
    reference = weights("torch", KERNELS["fused"])
    for name in ("svi", "graph", "torch"):
        for label, kernel in KERNELS.items():
            w = weights(name, kernel)
            close = torch.allclose(w, reference, rtol=1e-5, atol=1e-6)
            print(
                f"engine={name:5s} {label:13s} vs torch/fused: max |diff| {float((w - reference).abs().max()):.2e}, "
                f"within the test's tolerance: {close}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
