"""Quantizer throughput: fused chunked quantizer vs a naive unfused torch reference.

Measures GB/s of float32 input (16M floats = 64 MB by default) for quantize and dequantize,
single thread, median of repeats, with the naive reference (norm, divide, floor, rand, compare,
sign: one full pass per op) measured in the same run. Prints a table and writes
``bench/results/quantizer.json``.

Run::

    .venv/bin/python bench/bench_quantizer.py [--numel 16777216] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from qoda_hvd.quant import Quantizer, exponential_levels, optimal_levels, uniform_levels


def naive_quantize(x: torch.Tensor, num_levels: int, bucket_size: int, g: torch.Generator):
    """Textbook QSGD in unfused torch ops: every line is a full pass over the tensor."""
    xb = x.view(-1, bucket_size)
    norm = xb.norm(dim=1, keepdim=True)
    u = xb.abs() / norm
    y = u * (num_levels - 1)
    lo = y.floor()
    r = torch.rand(y.shape, generator=g)
    idx = lo + (r < (y - lo)).float()
    return (idx * xb.sign()).to(torch.int8).view(-1), norm.view(-1)


def naive_dequantize(symbols: torch.Tensor, norms: torch.Tensor, num_levels: int, bucket_size: int):
    return (symbols.view(-1, bucket_size).float() / (num_levels - 1) * norms[:, None]).view(-1)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--bucket-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantizer.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, bs = args.numel - args.numel % args.bucket_size, args.bucket_size
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    gbytes = n * 4 / 1e9
    rows = []
    # Optimal levels for this data from a 1000-bin histogram: bin edges k/1000 are not powers of
    # two, so the CPU cell lookup needs one tree step (exponential levels need none).
    u = (x.view(-1, bs).abs() / x.view(-1, bs).norm(dim=1, keepdim=True)).reshape(-1)
    hist = torch.histc(u, bins=1000, min=0, max=1)
    del u

    def add(name: str, seconds: float, ref: float | None) -> None:
        rows.append({"case": name, "seconds": seconds, "gb_per_s": gbytes / seconds,
                     "speedup_vs_naive": (ref / seconds) if ref else None})

    for bits in (2, 4, 8):
        lv_n = 2 ** (bits - 1)
        g = torch.Generator().manual_seed(1)
        t_naive_q = timed(lambda: naive_quantize(x, lv_n, bs, g), args.repeats)
        sym, nrm = naive_quantize(x, lv_n, bs, g)
        t_naive_d = timed(lambda: naive_dequantize(sym, nrm, lv_n, bs), args.repeats)
        add(f"naive quantize   b={bits}", t_naive_q, None)
        uq = Quantizer(uniform_levels(lv_n), bucket_size=bs)
        add(f"fused quantize   b={bits} uniform", timed(lambda: uq.quantize(x, g), args.repeats), t_naive_q)
        if bits > 2:
            eq = Quantizer(exponential_levels(lv_n), bucket_size=bs)
            add(f"fused quantize   b={bits} nonuniform", timed(lambda: eq.quantize(x, g), args.repeats), t_naive_q)
            oq = Quantizer(optimal_levels(hist, lv_n), bucket_size=bs)
            add(f"fused quantize   b={bits} optimal", timed(lambda: oq.quantize(x, g), args.repeats), t_naive_q)
        add(f"naive dequantize b={bits}", t_naive_d, None)
        qt = uq.quantize(x, g)
        out = torch.empty_like(x)
        add(f"fused dequantize b={bits} uniform", timed(lambda: uq.dequantize(qt, out=out), args.repeats), t_naive_d)
        if bits > 2:
            qe = eq.quantize(x, g)
            add(f"fused dequantize b={bits} nonuniform", timed(lambda: eq.dequantize(qe, out=out), args.repeats), t_naive_d)

    cores = args.threads
    print(f"quantizer bench: {n} float32 ({gbytes * 1e3:.0f} MB), bucket {bs}, {cores} thread(s), "
          f"median of {args.repeats}, torch {torch.__version__}")
    print(f"{'case':40s} {'ms':>9s} {'GB/s':>7s} {'x naive':>8s}")
    for r in rows:
        sp = f"{r['speedup_vs_naive']:.2f}" if r["speedup_vs_naive"] else "-"
        print(f"{r['case']:40s} {r['seconds'] * 1e3:9.1f} {r['gb_per_s']:7.3f} {sp:>8s}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "numel": n, "bucket_size": bs, "threads": cores, "repeats": args.repeats,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "rows": rows,
    }, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
