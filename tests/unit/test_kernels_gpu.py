"""The GPU kernels (Triton) give the CPU kernels' bits: under Triton's interpreter on the CPU
(always), and on a real GPU when there is one (skipped otherwise).

The interpreter is chosen when Triton's kernels are defined, so it runs in a fresh process with
``TRITON_INTERPRET=1`` set before :mod:`qoda_hvd.kernels.gpu` is imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

COMPARE = r"""
import json, sys
import numpy as np, torch
from qoda_hvd.kernels import level_table, stream_key, cpu, gpu
from qoda_hvd.quant import exponential_levels, optimal_levels, uniform_levels

device = sys.argv[1]
hist = np.histogram(np.abs(np.random.default_rng(0).standard_normal(20000)) / 4, bins=256,
                    range=(0, 1))[0].astype(np.float64)
families = {"uniform": uniform_levels, "exponential": exponential_levels,
            "optimal": lambda n: optimal_levels(hist, n)}
results = []
for name, make in families.items():
    for bits in (2, 3, 4, 5, 8):
        table = level_table(make(2 ** (bits - 1)))
        for norm in ("l2", "linf"):
            for bucket, n in ((1024, 5000), (100, 1003)):
                x = np.random.default_rng(bits).standard_normal(n).astype(np.float32)
                x[7:19] = 0
                key = stream_key(5, 1, 2**33 + bits)
                p1, n1, _ = cpu.quantize_pack(x, table, bucket, norm, key, base=37)
                xd = torch.from_numpy(x).to(device)
                p2, n2, _ = gpu.quantize_pack(xd, table, bucket, norm, key, base=37)
                o1 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
                o2 = torch.from_numpy(o1.copy()).to(device)
                cpu.dequantize_into(p1, n1, table, bucket, o1, accumulate=True)
                gpu.dequantize_into(p2, n2, table, bucket, o2, accumulate=True)
                results.append(dict(
                    case=f"{name}-{bits}bit-{norm}-b{bucket}",
                    norms=bool(np.array_equal(n1, n2.cpu().numpy())),
                    packed=bool(np.array_equal(p1, p2.cpu().numpy())),
                    decoded=bool(np.array_equal(o1, o2.cpu().numpy()))))
print(json.dumps(results))
"""


def run_compare(device: str, interpret: bool) -> list[dict]:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPARE, device], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(results: list[dict]) -> None:
    assert len(results) == 3 * 5 * 2 * 2
    wrong = [r for r in results if not (r["norms"] and r["packed"] and r["decoded"])]
    assert not wrong, wrong


def test_interpreted_gpu_kernels_match_cpu_bit_for_bit():
    check(run_compare("cpu", interpret=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernels_match_cpu_bit_for_bit():
    check(run_compare("cuda", interpret=False))
