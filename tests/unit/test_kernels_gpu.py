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

import numpy as np
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


# --- invalid values, NaN buckets, tiled norms and index arithmetic past 2**31 ------------------

EDGES = r"""
import json, sys
import numpy as np, torch
from qoda_hvd import PayloadError
from qoda_hvd.kernels import level_table, stream_key, cpu, gpu
from qoda_hvd.kernels.dispatch import InvalidValues
from qoda_hvd.quant import exponential_levels, uniform_levels

device = sys.argv[1]
dev = torch.device(device)
results = {}
key = stream_key(5, 1, 9)


def same(a, b):
    return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))


def host(t):
    return t.cpu().numpy()


# invalid packed values: the same count as the CPU kernel's, counted without a host sync
table = level_table(uniform_levels(4))  # 7 values in 3 bits: value 7 is outside the alphabet
x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
packed, norms, _ = cpu.quantize_pack(x, table, 1024, "l2", key)
packed = packed.copy()
packed[[0, 700, 1535]] = 0xFF
o1 = np.zeros(4096, np.float32)
c1 = cpu.dequantize_into(packed, norms, table, 1024, o1, accumulate=False)
o2 = torch.zeros(4096, device=dev)
bad = gpu.dequantize_into(torch.from_numpy(packed).to(dev), torch.from_numpy(norms).to(dev),
                          table, 1024, o2, accumulate=False)
results["invalid"] = dict(cpu=int(c1), gpu=int(bad.item()), dtype=str(bad.dtype),
                          decoded=same(o1, host(o2)))
# one counter per decode of a round, read back once by InvalidValues.check
iv = InvalidValues()
clean, _, _ = cpu.quantize_pack(x, table, 1024, "l2", key)
for label, p in (("payload from rank 0, segment of type 0", clean),
                 ("payload from rank 1, segment of type 0", packed)):
    gpu.dequantize_into(torch.from_numpy(p).to(dev), torch.from_numpy(norms).to(dev), table,
                        1024, torch.zeros(4096, device=dev), accumulate=True,
                        bad=iv.device_slot(dev, label, 7))
try:
    iv.check()
    results["check"] = "no error"
except PayloadError as e:
    results["check"] = str(e)
iv.check()  # started over empty
results["check_after"] = "no error"
if device == "cuda":  # a round of decodes through dispatch waits for the GPU only at check()
    from qoda_hvd.kernels import dispatch

    out = torch.zeros(4096, device=dev)
    dispatch.dequantize_into(clean, norms, table, 1024, out, accumulate=True, invalid=iv)
    iv.check()  # warm: tables on the device, pinned blocks, the counters
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in (clean, packed, clean):
            dispatch.dequantize_into(p, norms, table, 1024, out, accumulate=True, invalid=iv,
                                     label="payload from rank 1, segment of type 0")
        results["no_sync"] = "no sync"
    except RuntimeError as e:
        results["no_sync"] = str(e)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    try:
        iv.check()
    except PayloadError as e:
        results["check_cuda"] = str(e)

# NaN / Inf buckets: the same norms, symbols and decoded NaNs as the CPU kernel's
for norm in ("l2", "linf"):
    t = level_table(exponential_levels(8))
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    x[1500] = np.nan
    x[2100] = np.inf
    x[4000] = 3e19  # the L2 sum of squares overflows float32 in this bucket
    p1, n1, b1 = cpu.quantize_pack(x, t, 1024, norm, key)
    p2, n2, b2 = gpu.quantize_pack(torch.from_numpy(x).to(dev), t, 1024, norm, key)
    o1 = np.zeros(5000, np.float32)
    o2 = torch.zeros(5000, device=dev)
    c1 = cpu.dequantize_into(p1, n1, t, 1024, o1, accumulate=False)
    c2 = gpu.dequantize_into(p2, n2, t, 1024, o2, accumulate=False)
    results[f"nan-{norm}"] = dict(
        norms=same(n1, host(n2)), packed=same(p1, host(p2)), bad=[int(b1), int(b2)],
        decoded=same(o1, host(o2)), invalid=[int(c1), int(c2.item())],
        nan_buckets=[int(i) for i in np.flatnonzero(~np.isfinite(n1))])

# norms of buckets wider than a tile: a tiny tile makes the tiled path run here
gpu._NORM_TILE = 64
for norm in ("l2", "linf"):
    for bucket, n in ((1024, 3000), (1000, 2500), (100, 1003), (64, 640)):
        x = np.random.default_rng(bucket).standard_normal(n).astype(np.float32)
        x[::7] *= 1e3
        p1, n1, _ = cpu.quantize_pack(x, table, bucket, norm, key)
        p2, n2, _ = gpu.quantize_pack(torch.from_numpy(x).to(dev), table, bucket, norm, key)
        results[f"tiled-{norm}-b{bucket}"] = dict(norms=same(n1, host(n2)),
                                                  packed=same(p1, host(p2)))
x = np.ones(4096, np.float32)
x[3000] = np.nan  # in the last of 16 tiles
_, n2, _ = gpu.quantize_pack(torch.from_numpy(x).to(dev), table, 4096, "linf", key)
results["tiled-linf-nan"] = bool(np.isnan(host(n2)[0]))
gpu._NORM_TILE = 1 << 12

# a tensor of n > 2**31 / width coordinates: its first programs, run for real on a buffer
# that holds just their coordinates, give the CPU kernels' bytes and values (before the
# int64 byte count, n * width wrapped in int32 and nothing was stored)
for width_levels in (4, 8, 128):  # 3, 4 and 8 bits
    t = level_table(uniform_levels(width_levels))
    for n in (2**31 // t.width + 3, 2**31 - 1, 2**31 + 5, 2**34 + 1):
        m = 2048  # two quantize / dequantize programs, two buckets
        x = np.random.default_rng(n % 1000).standard_normal(m).astype(np.float32)
        p1, n1, _ = cpu.quantize_pack(x, t, 1024, "l2", key, base=7)
        xd = torch.from_numpy(x).to(dev)
        norms = torch.full((2,), -1.0, device=dev)
        out = torch.zeros(m * t.width // 8 + 1, dtype=torch.uint8, device=dev)
        gpu._launch_norms(xd, norms, n, 1024, "l2", 2)
        gpu._launch_quantize(xd, norms, out, n, t, 1024, key, 7, 2)
        o1 = np.full(m, 0.5, np.float32)
        cpu.dequantize_into(p1, n1, t, 1024, o1, accumulate=True)
        o2 = torch.full((m,), 0.5, device=dev)
        bad = torch.zeros(1, dtype=torch.int64, device=dev)
        packed_in = torch.zeros(m * t.width // 8 + 1, dtype=torch.uint8, device=dev)
        packed_in[:p1.size] = torch.from_numpy(p1).to(dev)
        packed_in[p1.size:] = torch.from_numpy(cpu.quantize_pack(
            np.random.default_rng(9).standard_normal(1024).astype(np.float32), t, 1024, "l2",
            key)[0][:1]).to(dev)  # the next program's first byte (a field may straddle into it)
        gpu._launch_dequantize(packed_in, torch.from_numpy(n1).to(dev), t, 1024, o2, n, bad,
                               True, 2)
        results[f"big-{t.width}bit-n{n}"] = dict(
            norms=same(n1, host(norms)), packed=same(p1, host(out)[:p1.size]),
            decoded=same(o1, host(o2)), invalid=int(bad.item()))
print(json.dumps(results))
"""


def run_edges(device: str, interpret: bool) -> dict:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", EDGES, device], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_edges(r: dict) -> None:
    assert r["invalid"] == dict(cpu=r["invalid"]["cpu"], gpu=r["invalid"]["cpu"],
                                dtype="torch.int64", decoded=True), r["invalid"]
    assert r["invalid"]["cpu"] >= 3
    if "no_sync" in r:  # on a GPU
        assert r["no_sync"] == "no sync", r["no_sync"]
        assert r["check_cuda"] == r["check"], r["check_cuda"]
    assert r["check"].startswith("payload from rank 1, segment of type 0: "), r["check"]
    assert r["check"].endswith(f"{r['invalid']['cpu']} packed value(s) outside the alphabet of 7")
    for norm in ("l2", "linf"):
        case = r[f"nan-{norm}"]
        assert case["norms"] and case["packed"] and case["decoded"], case
        assert case["invalid"] == [0, 0], case  # NaN norms decode to NaN, not to invalid values
        assert case["nan_buckets"] == ([1, 2, 3] if norm == "l2" else [1, 2]), case
        assert case["bad"] == [len(case["nan_buckets"])] * 2, case
    tiled = {k: v for k, v in r.items() if k.startswith("tiled-") and isinstance(v, dict)}
    assert len(tiled) == 8 and all(v["norms"] and v["packed"] for v in tiled.values()), tiled
    assert r["tiled-linf-nan"]
    big = {k: v for k, v in r.items() if k.startswith("big-")}
    assert len(big) == 12
    wrong = {k: v for k, v in big.items()
             if not (v["norms"] and v["packed"] and v["decoded"] and v["invalid"] == 0)}
    assert not wrong, wrong


def test_interpreted_gpu_kernels_invalid_values_nan_buckets_tiles_and_huge_n():
    check_edges(run_edges("cpu", interpret=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernels_invalid_values_nan_buckets_tiles_and_huge_n():
    check_edges(run_edges("cuda", interpret=False))


def test_launch_grids_cover_sizes_past_2_31_exactly():
    """The programs' index ranges, computed as the kernels do (int64 program starts), tile
    ``[0, n)`` and ``[0, nbytes)`` exactly past 2**31, and a grid over CUDA's limit is refused."""
    from qoda_hvd.kernels import gpu
    from qoda_hvd.kernels.tables import packed_size

    for n in (2**31 - 1, 2**31, 2**31 + 1023, 2**32 + 5, 3 * 2**33 + 17):
        for width in (2, 3, 4, 8):
            g = gpu.grids(n, 1024)
            per = 8 * gpu._GROUPS
            last = np.int64(g["quantize"] - 1)
            first_coord = last * np.int64(gpu._GROUPS) * 8
            assert first_coord < n <= first_coord + per
            # bytes of the last program: positions g * width + k, kept below nbytes
            pos = (last * gpu._GROUPS + np.arange(gpu._GROUPS, dtype=np.int64))[:, None] * width \
                + np.arange(width, dtype=np.int64)[None, :]
            nbytes = packed_size(n, width)
            kept = pos[pos < nbytes]
            assert kept.max() == nbytes - 1 and kept.min() == last * gpu._GROUPS * width
            assert (g["dequantize"] - 1) * gpu._DEQ_BLOCK < n <= g["dequantize"] * gpu._DEQ_BLOCK
            assert (g["norms"] - 1) * 1024 < n <= g["norms"] * 1024
            assert max(g.values()) <= gpu.MAX_GRID
    with pytest.raises(ValueError, match=r"n=68719476736 .*bucket_size=16 .*2147483647"):
        gpu.grids(2**36, 16)


NORMS_ARGS = {"x_ptr": "*fp32", "norms_ptr": "*fp32", "n": "i32", "bucket": "i32"}
#: kernel -> (its int and pointer arguments, its constexprs; a callable: from the module)
KERNEL_SIGNATURES = {
    # the largest bucket_size the config accepts (2**24): one block was limited to 2**20
    "_norms_kernel-l2-b2^24": (NORMS_ARGS, lambda gpu: dict(LINF=False,
                                                            **gpu._norm_tiling(1 << 24))),
    "_norms_kernel-linf-b2^24": (NORMS_ARGS, lambda gpu: dict(LINF=True,
                                                              **gpu._norm_tiling(1 << 24))),
    "_norms_kernel-l2-b1024": (NORMS_ARGS, lambda gpu: dict(LINF=False,
                                                            **gpu._norm_tiling(1024))),
    "_quantize_pack_kernel": (
        {"x_ptr": "*fp32", "norms_ptr": "*fp32", "out_ptr": "*u8", "n": "i32", "base": "i32",
         "bucket": "i32", "k0": "i64", "k1": "i64", "L": "i32", "bounds_ptr": "*fp32",
         "slope_ptr": "*fp32", "offset_ptr": "*fp32", "shift": "i32", "last_cell": "i32",
         "leaves": "i32", "term_lo_ptr": "*fp32", "term_scale_ptr": "*fp32"},
        dict(WIDTH=4, UNIFORM=False, STEPS=2, TERMS=0, GROUPS=128)),
    "_dequantize_kernel": (
        {"packed_ptr": "*u8", "norms_ptr": "*fp32", "values_ptr": "*fp32", "out_ptr": "*fp32",
         "n": "i32", "bucket": "i32", "bad_ptr": "*i64"},
        dict(WIDTH=3, ACCUMULATE=True, BLOCK=1024)),
}


@pytest.mark.parametrize("kernel", list(KERNEL_SIGNATURES))
def test_compiled_kernels_widen_n_before_arithmetic(kernel):
    """Compiled for a GPU (no GPU needed; this also checks what the interpreter does not, such
    as block sizes and loop-carried types): with ``n`` below 2**31, which Triton passes as
    int32, every use of ``n`` in the kernel's IR is its widening to int64."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the real kernels")
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qoda_hvd.kernels import gpu

    ints, constexprs = KERNEL_SIGNATURES[kernel]
    if callable(constexprs):
        constexprs = constexprs(gpu)
    fn = getattr(gpu, kernel.split("-")[0])
    signature = {name: ints.get(name, "constexpr") for name in fn.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"enable_fp_fusion": False})
    except Exception as e:  # no CUDA backend in this Triton build
        if "backend" in str(e).lower():
            pytest.skip(f"Triton cannot compile for CUDA here: {e}")
        raise
    ttir = compiled.asm["ttir"]
    uses = [line.strip() for line in ttir.splitlines()
            if re.search(r"%n\b", line) and "tt.func" not in line and "loc(" in line
            and not line.strip().startswith("#")]
    assert uses, ttir[:2000]
    narrow = [u for u in uses if not re.search(r"arith\.extsi %n : i32 to i64", u)]
    assert not narrow, narrow


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n, bits", [(2**31 // 4 + 3000, 4), (2**31 + 5000, 3)])
def test_gpu_kernels_at_a_real_size_past_2_31(n, bits):
    """A whole tensor of ``n`` coordinates on the GPU: its last buckets' bytes, norms and
    decoded values are the CPU kernels' for those buckets (before the int64 byte count, the
    4-bit case stored nothing)."""
    from qoda_hvd.kernels import cpu, gpu, level_table, stream_key
    from qoda_hvd.quant import uniform_levels

    if torch.cuda.mem_get_info()[0] < 10 * n:
        pytest.skip(f"needs {10 * n / 2**30:.0f} GiB of free GPU memory")
    table = level_table(uniform_levels(2 ** (bits - 1)))
    x = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    key = stream_key(1, 0, 3)
    packed, norms, bad = gpu.quantize_pack(x, table, 1024, "l2", key)
    assert int(bad) == 0
    start = (n - 5000) // 1024 * 1024  # the tail, from a bucket (and a byte) boundary
    tail = x[start:].cpu().numpy()
    p1, n1, _ = cpu.quantize_pack(tail, table, 1024, "l2", key, base=start)
    np.testing.assert_array_equal(packed[start * table.width // 8:].cpu().numpy(), p1)
    np.testing.assert_array_equal(norms[start // 1024:].cpu().numpy(), n1)
    out = torch.empty_like(x)
    assert int(gpu.dequantize_into(packed, norms, table, 1024, out, accumulate=False)) == 0
    o1 = np.zeros(tail.size, np.float32)
    cpu.dequantize_into(p1, n1, table, 1024, o1, accumulate=False)
    np.testing.assert_array_equal(out[start:].cpu().numpy(), o1)
