"""The per-step codec of the real exchange, next to its kernels and a memcpy, in one run.

``bench_kernels.py`` times the codec's kernels alone. A step of the exchange does more: it
fuses the gradients into per-type buffers, quantizes and packs each type, entropy codes, runs
the collective, decodes every rank's payload into the aggregate and hands it back to
``p.grad``. This bench times those phases as the exchange itself counts them
(``compression_stats()``), on the LM of ``examples/`` (quick: 3.7M parameters, full: 23M),
with the default compression (``Compression.layerwise(bits=4, types=model)``), and, in the
same process on the same gradient, the kernels' passes and ``memcpy`` of the same buffer:

- ``K=1``: one rank (the collective returns its own payload): the exchange's own overhead
  over its kernels, nothing else on the cores;
- ``K=2``: two fake ranks (threads, one core each): every rank decodes both payloads.

The goal (issue 24): the per-step codec (quantize + encode + decode, and the whole
``synchronize()`` minus the collective) <= 2x the kernels' sum and <= 4x memcpy.

Run::

    .venv/bin/python bench/bench_step.py --quick     # ~1 minute
    .venv/bin/python bench/bench_step.py             # the 23M LM

Prints a table and writes ``bench/results/step.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results" / "step.json"
PHASES = ("quantize_s", "encode_s", "exchange_s", "decode_s")


def lm(quick: bool):
    from transformer_lm import TransformerLM

    torch.manual_seed(0)
    vocab, d, layers, seq = (4096, 256, 2, 32) if quick else (16384, 512, 2, 64)
    return TransformerLM(vocab, d, 8, layers, 4 * d, seq), vocab, seq


def gradients(model, vocab: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (2, seq + 1), generator=g)
    model.zero_grad(set_to_none=True)
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def run_exchange(size: int, quick: bool, repeats: int) -> list[dict]:
    """Per rank, per repeat: the seconds of synchronize() and of each phase."""
    import qoda_hvd
    from qoda_hvd.comm import LocalGroup

    group = LocalGroup(size, timeout=600)
    out: list = [None] * size
    errors: list = []

    def rank(r: int) -> None:
        try:
            torch.set_num_threads(1)
            model, vocab, seq = lm(quick)
            grads = gradients(model, vocab, seq, seed=r)
            opt = qoda_hvd.DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters(),
                compression=qoda_hvd.Compression.layerwise(bits=4, types=model),
                communicator=group[r], overlap=False)
            ex = opt._exchange
            times = []
            for i in range(repeats + 3):  # 3 warm-up steps: compile, level update, agreement
                fresh = [g.clone() for g in grads]  # as autograd hands over new tensors
                for p, g in zip(model.parameters(), fresh):
                    p.grad = g
                before = ex.stats.as_dict()
                t0 = time.perf_counter()
                opt.synchronize()
                wall = time.perf_counter() - t0
                after = ex.stats.as_dict()
                with opt.skip_synchronize():
                    opt.step()
                if i >= 3:
                    times.append(dict(sync_s=wall, **{k: after[k] - before[k] for k in PHASES}))
            out[r] = times
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 3.7M LM")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 5)
    torch.set_num_threads(1)

    from bench_kernels import median_ns
    from qoda_hvd.kernels import cpu, level_table, stream_key
    from qoda_hvd.quant import optimal_levels

    model, vocab, seq = lm(args.quick)
    flat = torch.cat([g.reshape(-1) for g in gradients(model, vocab, seq, 0)]).contiguous()
    n = flat.numel()
    dst = torch.empty_like(flat)
    x = flat.numpy()
    hist = torch.histc((flat.abs() / flat.abs().max()), bins=256, min=0, max=1).double().numpy()
    table = level_table(optimal_levels(hist, 8))
    key = stream_key(0, 0, 0)
    packed, norms, _ = cpu.quantize_pack(x, table, 1024, "l2", key, threads=1)
    memcpy = median_ns(lambda: dst.copy_(flat), n, repeats)
    q_ns = median_ns(lambda: cpu.quantize_pack(x, table, 1024, "l2", key, threads=1,
                                               out=packed, norms=norms), n, repeats)
    d_ns = median_ns(lambda: cpu.dequantize_into(packed, norms, table, 1024, dst.numpy(),
                                                 accumulate=True, threads=1), n, repeats)

    rows = []
    for size in (1, 2):
        per_rank = run_exchange(size, args.quick, repeats)
        med = {k: statistics.median(max(ranks[i][k] for ranks in per_rank)
                                    for i in range(repeats)) * 1e9 / n
               for k in ("sync_s", *PHASES)}
        codec = med["quantize_s"] + med["encode_s"] + med["decode_s"]
        kernels = q_ns + size * d_ns  # one quantize + pack, K decodes
        overhead = med["sync_s"] - med["exchange_s"]
        rows.append(dict(ranks=size, **{k.replace("_s", "_ns"): v for k, v in med.items()},
                         codec_ns=codec, sync_minus_collective_ns=overhead, kernels_ns=kernels,
                         codec_x_kernels=codec / kernels, codec_x_memcpy=codec / memcpy,
                         sync_minus_collective_x_kernels=overhead / kernels,
                         sync_minus_collective_x_memcpy=overhead / memcpy))

    print(f"\n{n:,} coordinates (LM gradient), one thread per rank, median of {repeats} steps "
          f"(the slower rank's); ns per coordinate per step")
    print(f"kernels alone: quantize+pack {q_ns:.3f}, unpack+dequantize+accumulate {d_ns:.3f}; "
          f"memcpy {memcpy:.3f}\n")
    print(f"{'K':>2s} {'quantize':>9s} {'encode':>7s} {'decode':>7s} {'codec':>7s} "
          f"{'x kern':>7s} {'x memcpy':>8s} | {'sync-coll':>9s} {'x kern':>7s} {'x memcpy':>8s}")
    for r in rows:
        print(f"{r['ranks']:2d} {r['quantize_ns']:9.3f} {r['encode_ns']:7.3f} {r['decode_ns']:7.3f} "
              f"{r['codec_ns']:7.3f} {r['codec_x_kernels']:7.2f} {r['codec_x_memcpy']:8.2f} | "
              f"{r['sync_minus_collective_ns']:9.3f} {r['sync_minus_collective_x_kernels']:7.2f} "
              f"{r['sync_minus_collective_x_memcpy']:8.2f}")
    print("\ncodec = quantize + encode + decode as the exchange counts them; sync-coll = the "
          "whole synchronize() minus the collective (fusion, hand-back, agreement, Python)")
    print("goal: codec <= 2x the kernels' sum (one quantize+pack, K decodes) and <= 4x memcpy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(numel=n, repeats=repeats, memcpy_ns=memcpy,
                                        quantize_pack_ns=q_ns, dequantize_ns=d_ns, rows=rows),
                                   indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
