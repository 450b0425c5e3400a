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

Each rank times the kernels and a memcpy of its own gradient right before each step, so every
ratio compares figures of the same moment (the medians are over those per-step ratios).

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


def run_exchange(size: int, quick: bool, repeats: int) -> list[list[dict]]:
    """Per rank, per repeat: ns per coordinate of synchronize() and of each phase, and of the
    kernels and memcpy timed by that rank on its own gradient right before that step (the same
    moment's load: on a shared machine only such side-by-side ratios mean something)."""
    import qoda_hvd
    from qoda_hvd.comm import LocalGroup
    from qoda_hvd.kernels import cpu, stream_key

    def rank(r: int, comm) -> list[dict]:
        model, vocab, seq = lm(quick)
        grads = gradients(model, vocab, seq, seed=r)
        flat = torch.cat([g.reshape(-1) for g in grads]).contiguous()
        n, x, dst = flat.numel(), flat.numpy(), torch.empty_like(flat)
        opt = qoda_hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters(),
            compression=qoda_hvd.Compression.layerwise(bits=4, types=model),
            communicator=comm, overlap=False)
        ex = opt._exchange
        rows = []
        for i in range(repeats + 3):  # 3 warm-up steps: compile, level update, agreement
            # the kernels on this rank's gradient with the exchange's levels (type 0's)
            table = ex.codec.table(ex.lq.quantizer(0).levels)
            key = stream_key(0, r, i)
            t0 = time.perf_counter()
            dst.copy_(flat)
            t1 = time.perf_counter()
            packed, norms, _ = cpu.quantize_pack(x, table, 1024, "l2", key, threads=1)
            t2 = time.perf_counter()
            cpu.dequantize_into(packed, norms, table, 1024, dst.numpy(), accumulate=True,
                                threads=1)
            t3 = time.perf_counter()
            fresh = [g.clone() for g in grads]  # as autograd hands over new tensors
            for p, g in zip(model.parameters(), fresh):
                p.grad = g
            before = ex.stats.as_dict()
            t4 = time.perf_counter()
            opt.synchronize()
            wall = time.perf_counter() - t4
            after = ex.stats.as_dict()
            with opt.skip_synchronize():
                opt.step()
            if i >= 3:
                ns = 1e9 / n
                rows.append(dict(memcpy=(t1 - t0) * ns, kernel_quantize=(t2 - t1) * ns,
                                 kernel_decode=(t3 - t2) * ns, sync=wall * ns,
                                 **{k[:-2]: (after[k] - before[k]) * ns for k in PHASES}))
        return rows

    return LocalGroup(size, timeout=600).run(rank)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 3.7M LM")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for size in (1, 2):
        per_rank = run_exchange(size, args.quick, args.repeats)
        step_rows = []
        for i in range(args.repeats):
            # the slower rank's step, with the kernels that rank timed just before it
            r = max(per_rank, key=lambda rank_rows: rank_rows[i]["sync"])[i]
            codec = r["quantize"] + r["encode"] + r["decode"]
            kernels = r["kernel_quantize"] + size * r["kernel_decode"]  # K decodes per step
            overhead = r["sync"] - r["exchange"]
            step_rows.append(dict(r, codec=codec, kernels=kernels, sync_minus_collective=overhead,
                                  codec_x_kernels=codec / kernels, codec_x_memcpy=codec / r["memcpy"],
                                  overhead_x_kernels=overhead / kernels,
                                  overhead_x_memcpy=overhead / r["memcpy"]))
        med = {k: statistics.median(x[k] for x in step_rows) for k in step_rows[0]}
        rows.append(dict(ranks=size, **med))

    n = 3_685_376 if args.quick else None
    print(f"\nLM gradient{f' ({n:,} coordinates)' if n else ''}, one thread per rank, default "
          f"compression; medians over {args.repeats} steps (the slower rank's) of ns per "
          "coordinate, and of ratios taken within each step")
    print(f"{'K':>2s} {'memcpy':>7s} {'k.quant':>7s} {'k.dec':>7s} | {'quantize':>8s} {'encode':>7s} "
          f"{'decode':>7s} {'codec':>7s} {'x kern':>6s} {'x mcpy':>6s} | {'sync-coll':>9s} "
          f"{'x kern':>6s} {'x mcpy':>6s}")
    for r in rows:
        print(f"{r['ranks']:2d} {r['memcpy']:7.3f} {r['kernel_quantize']:7.3f} "
              f"{r['kernel_decode']:7.3f} | {r['quantize']:8.3f} {r['encode']:7.3f} "
              f"{r['decode']:7.3f} {r['codec']:7.3f} {r['codec_x_kernels']:6.2f} "
              f"{r['codec_x_memcpy']:6.2f} | {r['sync_minus_collective']:9.3f} "
              f"{r['overhead_x_kernels']:6.2f} {r['overhead_x_memcpy']:6.2f}")
    print("\nk.quant / k.dec: the kernels alone (quantize+pack; unpack+dequantize+accumulate), "
          "timed by the same rank right before each step; codec = quantize + encode + decode as "
          "the exchange counts them; sync-coll = the whole synchronize() minus the collective "
          "(fusion, hand-back, agreement, Python); x kern: over one quantize+pack and K decodes")
    print("goal (issue 24): codec <= 2x the kernels' sum and <= 4x memcpy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(quick=args.quick, repeats=args.repeats, rows=rows),
                                   indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
