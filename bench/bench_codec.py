"""Codec benchmark: bits per coordinate against the empirical entropy, and codec speed.

Rate: symbols come from real gradients of three small torch.nn models (an MLP, a convnet, a
transformer encoder block; random data, one backward pass), quantized per tensor with uniform
levels L = 2**(b-1) at b = 2, 3, 4, 8 bits, L2 bucket norms over 1024 coordinates. Tensors of
at least 1024 coordinates become segments (smaller ones travel raw and are left out of the
rate). For each codec the table reports code bits per symbol (codec side information included,
norms and header excluded), next to the empirical entropy of each segment's symbols summed over
segments; "ans/H" is ANS over entropy on segments of >= 64k symbols; "payload" is the whole
payload (header, tables, norms, code, CRC) per coordinate with codec="auto"; fp32/fp16/int8
are the baselines (int8 = one byte per symbol plus the same float32 norms).

Speed: encode and decode ns/symbol per codec on one thread, over 1M and 16M symbols tiled from
the MLP's quantized gradient (so the symbol statistics are real), median of repeats.

Run::

    .venv/bin/python bench/bench_codec.py           # full run (~2-3 minutes on 2 cores)
    .venv/bin/python bench/bench_codec.py --quick   # 1M symbols only, fewer repeats

Prints tables and writes ``bench/results/codec.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qoda_hvd.coding import CODECS, Segment, decode, encode_bytes, inspect_payload
from qoda_hvd.coding.codecs import to_values
from qoda_hvd.coding.model import CountsModel

BUCKET = 1024
MIN_SEGMENT = 1024
BITS = (2, 3, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results" / "codec.json"


# --------------------------------------------------------------------------- quantizer

def _local_quantize(x: torch.Tensor, num_levels: int, g: torch.Generator):
    """LOCAL FALLBACK quantizer (used only if qoda_hvd.quant is missing): unbiased stochastic
    rounding to uniform levels j / (L - 1), L2 norm per bucket of BUCKET coordinates."""
    n = x.numel()
    nb = -(-n // BUCKET)
    flat = torch.zeros(nb * BUCKET)
    flat[:n] = x.reshape(-1)
    buckets = flat.view(nb, BUCKET)
    norms = buckets.norm(dim=1, keepdim=True)
    u = (buckets.abs() / norms.clamp_min(1e-30)) * (num_levels - 1)
    low = u.floor()
    level = low + (torch.rand(u.shape, generator=g) < (u - low)).float()
    symbols = (torch.sign(buckets) * level).to(torch.int8).reshape(-1)[:n]
    return symbols.numpy(), norms.reshape(-1).float().numpy()


def make_quantizer():
    """(quantize(x, L, g) -> (symbols int8 np, norms float32 np), description)."""
    try:
        from qoda_hvd.quant import uniform_levels
        from qoda_hvd.quant.quantizer import quantize

        def quantize_project(x, num_levels, g):
            q = quantize(x, uniform_levels(num_levels), g, bucket_size=BUCKET, norm="l2")
            return q.symbols.numpy(), q.norms.numpy()

        quantize_project(torch.ones(3), 2, torch.Generator().manual_seed(0))
        return quantize_project, "qoda_hvd.quant.quantizer.quantize (uniform levels, L2, bucket 1024)"
    except (ImportError, AttributeError, TypeError) as e:
        return _local_quantize, f"local fallback quantizer in bench_codec.py ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------- gradients

def model_gradients(seed: int = 0) -> dict[str, list[tuple[str, torch.Tensor]]]:
    torch.manual_seed(seed)  # model init only; data from an explicit generator below
    g = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    conv = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, 10))
    block = nn.Sequential(nn.Embedding(1000, 256),
                          nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True))
    head = nn.Linear(256, 1000)
    out = {}
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(64, 784, generator=g)
    loss_fn(mlp(x), torch.randint(0, 10, (64,), generator=g)).backward()
    out["mlp"] = [(n, p.grad) for n, p in mlp.named_parameters()]
    x = torch.randn(32, 3, 32, 32, generator=g)
    loss_fn(conv(x), torch.randint(0, 10, (32,), generator=g)).backward()
    out["convnet"] = [(n, p.grad) for n, p in conv.named_parameters()]
    tokens = torch.randint(0, 1000, (8, 64), generator=g)
    logits = head(block(tokens))
    loss_fn(logits.reshape(-1, 1000), torch.randint(0, 1000, (8 * 64,), generator=g)).backward()
    out["transformer"] = [(n, p.grad) for n, p in list(block.named_parameters()) + list(head.named_parameters())]
    return out


# --------------------------------------------------------------------------- rate

def rate_rows(grads, quantize) -> list[dict]:
    rows = []
    for model_name, named in grads.items():
        big = [(n, t) for n, t in named if t is not None and t.numel() >= MIN_SEGMENT]
        for b in BITS:
            num_levels = 2 ** (b - 1)
            g = torch.Generator().manual_seed(b)
            segments = []
            for i, (_, t) in enumerate(big):
                s, norms = quantize(t.detach().float(), num_levels, g)
                segments.append(Segment(i, 0, s.size, BUCKET, s, norms, num_levels))
            n = sum(s.numel for s in segments)
            entropy = 0.0
            large_entropy = 0.0
            large_ans = 0
            for seg in segments:
                model = CountsModel.from_values(to_values(seg.symbols, num_levels), 2 * num_levels - 1)
                entropy += model.entropy_bits()
                if seg.numel >= 65536:
                    large_entropy += model.entropy_bits()
                    large_ans += 8 * len(CODECS["ans"].encode(seg.symbols, num_levels))
            levels = {0: np.linspace(0, 1, num_levels, dtype=np.float32)}
            row = {"model": model_name, "bits": b, "num_levels": num_levels, "coordinates": n,
                   "segments": len(segments), "entropy": entropy / n}
            for codec in ("ans", "elias", "fixed", "zstd", "auto"):
                payload = encode_bytes(segments, levels, codec)
                layout = inspect_payload(payload)
                row[codec] = 8 * sum(layout.code_bytes) / n
                if codec == "auto":
                    row["payload_auto"] = 8 * layout.nbytes / n
                    row["auto_choice"] = sorted(set(layout.codecs))
                out = decode(payload)
                assert all(np.array_equal(a.symbols, s.symbols) for a, s in zip(out.segments, segments))
            row["norms"] = 32 * sum(s.num_buckets for s in segments) / n
            row["ans_over_entropy_64k"] = large_ans / large_entropy if large_entropy else None
            row["fp32"], row["fp16"] = 32.0, 16.0
            row["int8"] = 8.0 + row["norms"]
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- speed

def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed_rows(grads, quantize, sizes, bits, repeats) -> list[dict]:
    flat = torch.cat([t.reshape(-1) for _, t in grads["mlp"]])
    rows = []
    for b in bits:
        num_levels = 2 ** (b - 1)
        base, _ = quantize(flat, num_levels, torch.Generator().manual_seed(1))
        for n in sizes:
            s = np.resize(base, n)  # tiles the real symbols
            for name, codec in CODECS.items():
                reps = repeats if n <= 1 << 20 or name != "elias" else 1
                body = codec.encode(s, num_levels)
                enc = timed(lambda: codec.encode(s, num_levels), reps)
                dec = timed(lambda: codec.decode(body, n, num_levels), reps)
                assert np.array_equal(codec.decode(body, n, num_levels), s)
                rows.append({"codec": name, "bits": b, "numel": n, "encode_ns": 1e9 * enc / n,
                             "decode_ns": 1e9 * dec / n, "bits_per_symbol": 8 * len(body) / n,
                             "repeats": reps})
    return rows


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M symbols, bits 2 and 8, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quantize, quantizer_used = make_quantizer()
    start = time.perf_counter()
    grads = model_gradients()
    rates = rate_rows(grads, quantize)
    if args.quick:
        sizes, bits, repeats = [1 << 20], [2, 8], args.repeats or 3
    else:
        sizes, bits, repeats = [1 << 20, 1 << 24], [2, 4, 8], args.repeats or 5
    speeds = speed_rows(grads, quantize, sizes, bits, repeats)

    print(f"quantizer: {quantizer_used}")
    print("\nRate: code bits per symbol (side info included; norms/header excluded), per model and bits")
    head = (f"{'model':<12}{'b':>2}{'coords':>9}{'H':>7}{'ans':>7}{'elias':>7}{'fixed':>7}{'zstd':>7}"
            f"{'auto':>7}{'ans/H':>8}{'norms':>7}{'payload':>8}{'int8':>6}{'fp16':>6}{'fp32':>6}  auto picks")
    print(head)
    for r in rates:
        ratio = f"{r['ans_over_entropy_64k']:.4f}" if r["ans_over_entropy_64k"] else "   -"
        print(f"{r['model']:<12}{r['bits']:>2}{r['coordinates']:>9}{r['entropy']:>7.3f}{r['ans']:>7.3f}"
              f"{r['elias']:>7.3f}{r['fixed']:>7.3f}{r['zstd']:>7.3f}{r['auto']:>7.3f}{ratio:>8}"
              f"{r['norms']:>7.3f}{r['payload_auto']:>8.3f}{r['int8']:>6.2f}{r['fp16']:>6.0f}"
              f"{r['fp32']:>6.0f}  {','.join(r['auto_choice'])}")
    print("\nSpeed: ns/symbol, 1 thread, median of repeats (symbols tiled from the MLP gradient)")
    print(f"{'codec':<7}{'b':>2}{'numel':>10}{'encode':>9}{'decode':>9}{'bits/sym':>9}{'reps':>5}")
    for r in speeds:
        print(f"{r['codec']:<7}{r['bits']:>2}{r['numel']:>10}{r['encode_ns']:>9.2f}{r['decode_ns']:>9.2f}"
              f"{r['bits_per_symbol']:>9.3f}{r['repeats']:>5}")
    elapsed = time.perf_counter() - start
    print(f"\ntotal {elapsed:.1f} s")

    import constriction
    import zstandard

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quantizer": quantizer_used, "bucket_size": BUCKET, "quick": args.quick,
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "constriction": getattr(constriction, "__version__", "0.5"), "zstandard": zstandard.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "seconds": elapsed}
    args.out.write_text(json.dumps({"meta": meta, "rate": rates, "speed": speeds}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
