"""Kernel benchmark: the codec's passes in ns per coordinate on one core, next to ``memcpy``.

The input is a real gradient: one backward pass of the transformer LM of ``examples/`` at the
end-to-end benchmark's full size (vocab 16384, d 512, 2 layers: ~23M parameters), flattened
into one float32 buffer, buckets of 1024, L2 norms unless said. Every figure is the median of
``--repeats`` runs in this process, and ``memcpy`` (``dst.copy_(src)`` of the same buffer) is
measured in the same run, so the ratio column holds on a shared machine.

Rows:

- ``old``: the previous path (:class:`qoda_hvd.quant.Quantizer` to int8 symbols, then the
  ``fixed`` codec's numpy packing; decode = numpy unpacking + ``Quantizer.dequantize``).
- ``new``: :mod:`qoda_hvd.kernels` (one pass each way), per level family and bit width.
- entropy stage on the new path's packed bytes: ``rans`` encode / decode, and bits per
  coordinate against the empirical entropy of the packed bytes and of the symbols.

Run::

    .venv/bin/python bench/bench_kernels.py            # ~2 minutes on 2 cores
    .venv/bin/python bench/bench_kernels.py --quick    # 4M coordinates, fewer repeats

Prints a table and writes ``bench/results/kernels.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
BUCKET = 1024


def lm_gradient(quick: bool) -> torch.Tensor:
    from transformer_lm import TransformerLM

    torch.manual_seed(0)
    vocab, d, layers, seq = (4096, 256, 2, 32) if quick else (16384, 512, 2, 64)
    model = TransformerLM(vocab, d, 8, layers, 4 * d, seq)
    idx = torch.randint(0, vocab, (2, seq + 1))
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def median_ns(fn, n: int, repeats: int) -> float:
    fn()  # warm (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e9 / n


def entropy_per_item(values: np.ndarray) -> float:
    c = np.bincount(values, minlength=256)
    p = c[c > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 4M-coordinate model, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)

    from qoda_hvd.coding import bits, rans
    from qoda_hvd.coding.codecs import fixed_width, from_values, to_values
    from qoda_hvd.kernels import cpu, level_table, stream_key
    from qoda_hvd.quant import Quantizer, exponential_levels, optimal_levels, uniform_levels
    from qoda_hvd.quant.quantizer import QuantizedTensor

    g = lm_gradient(args.quick).contiguous()
    n = g.numel()
    x = g.numpy()
    dst = torch.empty_like(g)
    key = stream_key(0, 0, 0)
    rows: list[dict] = []

    def row(what: str, path: str, ns: float, **extra) -> None:
        rows.append(dict(what=what, path=path, ns_per_coordinate=ns, **extra))

    memcpy = median_ns(lambda: dst.copy_(g), n, repeats)
    row("memcpy (dst.copy_(src), read 4 B + write 4 B)", "floor", memcpy)
    row("read-only sum", "floor", median_ns(lambda: g.sum(), n, repeats))

    hist = np.histogram(np.abs(x[x != 0][:1_000_000]) / (np.abs(x).max() + 1e-30), bins=256,
                        range=(0, 1))[0].astype(np.float64)
    families = {"uniform": uniform_levels, "exponential": exponential_levels,
                "optimal": lambda k: optimal_levels(hist, k)}

    # -- old path: torch quantizer -> int8 symbols -> numpy packing, and back -------------
    lv = uniform_levels(8)
    quantizer = Quantizer(lv, bucket_size=BUCKET)
    gen = torch.Generator().manual_seed(0)
    qt = quantizer.quantize(g, gen)
    width = fixed_width(8)
    row("quantize (uniform, 4 bits)", "old", median_ns(lambda: quantizer.quantize(g, gen), n, repeats))
    packed_old = bits.pack_fixed(to_values(qt.symbols.numpy(), 8), width)
    row("pack (fixed, 4 bits)", "old", median_ns(
        lambda: bits.pack_fixed(to_values(qt.symbols.numpy(), 8), width), n, repeats))

    def old_decode():
        sym = from_values(bits.unpack_fixed(packed_old, n, width), 8)
        q2 = QuantizedTensor(torch.from_numpy(sym), qt.norms, torch.Size([n]), torch.float32, BUCKET, 8)
        quantizer.dequantize(q2, out=dst, accumulate=True)
    row("unpack + dequantize + accumulate (4 bits)", "old", median_ns(old_decode, n, repeats))

    # -- new path ------------------------------------------------------------------------
    for fam, make in families.items():
        for b in (2, 3, 4, 8):
            table = level_table(make(2 ** (b - 1)))
            packed, norms, _ = cpu.quantize_pack(x, table, BUCKET, "l2", key, threads=1)
            q_ns = median_ns(lambda: cpu.quantize_pack(x, table, BUCKET, "l2", key, threads=1,
                                                       out=packed, norms=norms), n, repeats)
            d_ns = median_ns(lambda: cpu.dequantize_into(packed, norms, table, BUCKET, dst.numpy(),
                                                         accumulate=True, threads=1), n, repeats)
            row(f"quantize + pack ({fam}, {b} bits)", "new", q_ns, family=fam, bits=b)
            row(f"unpack + dequantize + accumulate ({fam}, {b} bits)", "new", d_ns, family=fam, bits=b)
    table = level_table(uniform_levels(8))
    packed, norms, _ = cpu.quantize_pack(x, table, BUCKET, "linf", key, threads=1)
    row("quantize + pack (uniform, 4 bits, linf)", "new", median_ns(
        lambda: cpu.quantize_pack(x, table, BUCKET, "linf", key, threads=1, out=packed,
                                  norms=norms), n, repeats))
    packed, norms, _ = cpu.quantize_pack(x, table, BUCKET, "l2", key, threads=1)
    row("quantize + pack (uniform, 4 bits), 2 threads", "new", median_ns(
        lambda: cpu.quantize_pack(x, table, BUCKET, "l2", key, threads=2, out=packed,
                                  norms=norms), n, repeats))

    # -- entropy stage on the packed bytes (4 bits, optimal levels: the default) ----------
    table = level_table(families["optimal"](8))
    packed, norms, _ = cpu.quantize_pack(x, table, BUCKET, "l2", key, threads=1)
    body = rans.encode_bytes(packed)
    enc = median_ns(lambda: rans.encode_bytes(packed), n, repeats)
    dec = median_ns(lambda: rans.decode_bytes(body, packed.size), n, repeats)
    h_bytes = entropy_per_item(packed) * packed.size / n
    sym = bits.unpack_fixed(packed, n, table.width)
    h_sym = entropy_per_item(sym)
    rans_bits = 8 * len(body) / n
    row("rans encode (optimal, 4 bits)", "new", enc, bits_per_coordinate=rans_bits)
    row("rans decode (optimal, 4 bits)", "new", dec)

    print(f"\n{n:,} float32 coordinates (LM gradient), one thread, median of {repeats}; "
          f"memcpy {memcpy:.3f} ns/coordinate\n")
    print(f"{'what':58s} {'path':5s} {'ns/coord':>9s} {'x memcpy':>9s}")
    for r in rows:
        r["x_memcpy"] = r["ns_per_coordinate"] / memcpy
        print(f"{r['what']:58s} {r['path']:5s} {r['ns_per_coordinate']:9.3f} {r['x_memcpy']:9.2f}")
    print(f"\nrans: {rans_bits:.4f} bits/coordinate; entropy of the packed bytes "
          f"{h_bytes:.4f} (rans/H = {rans_bits / h_bytes:.4f}); of the symbols {h_sym:.4f}; "
          f"fixed {table.width}; encode + decode {enc + dec:.2f} ns/coordinate")
    summary = dict(
        numel=n, repeats=repeats, memcpy_ns=memcpy, rans_bits=rans_bits,
        packed_entropy_bits=h_bytes, symbol_entropy_bits=h_sym, rans_over_entropy=rans_bits / h_bytes,
        machine=dict(python=platform.python_version(), torch=torch.__version__,
                     processor=platform.processor() or platform.machine()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
