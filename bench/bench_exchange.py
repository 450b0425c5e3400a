"""Bytes on the wire per rank per step vs the number of ranks K, for each exchange.

Two tables. ``--per-node``: bytes per NODE that cross the inter-node link and that stay inside
the node, counted on fake ranks (threads, :class:`qoda_hvd.comm.LocalGroup` placed on fake nodes,
every byte each rank sends recorded by destination) for L ranks per node x M nodes, next to the
formulas of the two-level design (see :func:`formulas`). Otherwise (the default):

Launches real jobs (``mpirun -np K``, Horovod's collectives) for K = 2, 3, 4 and, in each,
trains a transformer block for a few steps with ``qoda_hvd.DistributedOptimizer``:

- ``fp32 allreduce``: ``Compression.none`` (one fused allreduce; logical ring bytes);
- ``allgather`` and ``scatter_gather``: ``Compression.layerwise`` (4 bits, ``auto`` coding).

Bytes are the communicators' logical counts (what the algorithm must move per rank; see
``qoda_hvd.comm.base``), so they do not depend on the machine. Times are printed too but with
K ranks sharing 2 cores they say little; step time vs link bandwidth is bench/e2e's job.

Usage::

    .venv/bin/python bench/bench_exchange.py            # K = 2, 3, 4: about 1 minute
    .venv/bin/python bench/bench_exchange.py --ranks 2 3 --steps 3
    .venv/bin/python bench/bench_exchange.py --per-node # L 1,2,4,8 x M 2,4,8 (K <= 64) on fake ranks
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("fp32 allreduce", "allgather", "scatter_gather")


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    return nn.Sequential(layer, nn.Linear(256, 256))


def worker(out_path: str, steps: int, bits: int) -> None:
    import horovod.torch as hvd
    import torch
    from torch import nn

    import qoda_hvd

    hvd.init()
    torch.set_num_threads(1)
    rows = []
    for strategy in STRATEGIES:
        model = _model()
        if strategy == "fp32 allreduce":
            comp, exchange = qoda_hvd.Compression.none, "auto"
        else:
            comp, exchange = qoda_hvd.Compression.layerwise(bits=bits, types=model), strategy
        opt = qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters(), lr=0.01),
                                            model.named_parameters(), compression=comp,
                                            exchange=exchange)
        g = torch.Generator().manual_seed(hvd.rank())
        sent, recv, secs = [], [], []
        for _ in range(steps):
            x = torch.randn(8, 32, 256, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x).backward()
            before = opt.compression_stats()
            opt.step()
            after = opt.compression_stats()
            sent.append(after["bytes_sent"] - before["bytes_sent"])
            recv.append(after["bytes_received"] - before["bytes_received"])
            secs.append(sum(after[k] - before[k] for k in
                            ("time_quantize_s", "time_encode_s", "time_exchange_s", "time_decode_s")))
        stats = opt.compression_stats()
        mine = torch.tensor([statistics.median(sent), statistics.median(recv), statistics.median(secs)],
                            dtype=torch.float64)
        per_rank = hvd.allgather(mine.unsqueeze(0), name=f"bench.{strategy}")
        rows.append({
            "K": hvd.size(), "strategy": strategy,
            "coordinates": sum(p.numel() for p in model.parameters()),
            "bytes_sent_per_rank": per_rank[:, 0].max().item(),
            "bytes_received_per_rank": per_rank[:, 1].max().item(),
            "bits_per_coordinate": stats["bits_per_coordinate"],
            "collectives_per_step": stats["collectives"] / max(stats["exchanges"], 1),
            "comm_seconds_median": per_rank[:, 2].median().item(),
        })
    if hvd.rank() == 0:
        Path(out_path).write_text(json.dumps(rows))
    hvd.shutdown()


# ------------------------------------------------------------------ per node, on fake ranks
#: The exchanges of the per-node table: (row label, compression, exchange).
PER_NODE_ROWS = (("fp32 ring", "none", "auto"), ("flat allgather", "layerwise", "allgather"),
                 ("flat scatter_gather", "layerwise", "scatter_gather"),
                 ("two-level", "layerwise", "hierarchical"))


def formulas(L: int, M: int, n: int, payload: float) -> dict[str, dict[str, float]]:
    """Bytes per node and step, inter-node and intra-node, of each exchange, with N = ``n``
    coordinates and ``payload`` = N b/8 (one rank's whole compressed gradient, as measured).

    The design's (issue 23) inter-node formulas, one corrected: the flat allgather sends
    (K-1) N b/8 per RANK, of which (K-L) N b/8 leave the node; a node hosts L ranks, so per
    NODE it is L (K-L) N b/8 = L^2 (M-1) N b/8 (the table's (K-1) N b/8 holds for L = 1 only).
    The fp32 ring is counted as the fake ranks count an allreduce: a ring in rank order, which
    crosses each node boundary once.

    Example::

        >>> f = formulas(8, 8, 1000, 500.0)
        >>> round(f["fp32 ring"]["inter"]), round(f["flat allgather"]["inter"]), f["two-level"]["inter"]
        (7875, 224000, 875.0)
    """
    K = L * M
    two_inter = (M - 1) * payload if M <= 2 else 2 * (M - 1) / M * payload
    return {
        "fp32 ring": {"inter": 2 * (K - 1) / K * 4 * n,
                      "intra": (L - 1) * 2 * (K - 1) / K * 4 * n,
                      "issue": 2 * (K - 1) / K * 4 * n},
        "flat allgather": {"inter": L * (K - L) * payload, "intra": L * (L - 1) * payload,
                           "issue": (K - 1) * payload},
        "flat scatter_gather": {"inter": 2 * L * (M - 1) / M * payload,
                                "intra": 2 * L * (L - 1) / K * payload,
                                "issue": 2 * L * (M - 1) / M * payload},
        "two-level": ({"inter": 2 * L * (M - 1) / M * payload if K > 2 else (K - 1) * payload,
                       "intra": 0.0, "issue": two_inter} if L == 1 else
                      {"inter": two_inter, "intra": 2 * (L - 1) * 4 * n, "issue": two_inter}),
    }


def per_node_counts(L: int, M: int, n: int, bits: int, rows=PER_NODE_ROWS) -> list[dict]:
    """Run each exchange once more after a warm-up step on L x M fake ranks; count per node."""
    import numpy as np
    import torch

    import qoda_hvd
    from qoda_hvd.comm import LocalGroup
    from qoda_hvd.config import EXCHANGES

    K = L * M
    out = []
    for label, kind, exchange in rows:
        if exchange not in EXCHANGES and exchange != "auto":
            out.append({"L": L, "M": M, "K": K, "exchange": label,
                        "skipped": f"exchange={exchange!r} is not in this build"})
            continue
        group = LocalGroup(K, timeout=600, ranks_per_node=L, record_traffic=True)
        barrier = threading.Barrier(K)

        def work(r: int, comm) -> dict:
            model = torch.nn.Linear(1024, n // 1024, bias=False)
            comp = (qoda_hvd.Compression.none if kind == "none" else
                    qoda_hvd.Compression.layerwise(bits=bits, levels="uniform",
                                                   coding="fixed", types=model))
            opt = qoda_hvd.DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.0),
                named_parameters=model.named_parameters(), compression=comp,
                communicator=comm, exchange=exchange, overlap=False)
            g = torch.Generator().manual_seed(r)
            for step in range(2):  # step 0 agrees settings and levels; step 1 is counted
                model.weight.grad = torch.randn(model.weight.shape, generator=g)
                barrier.wait()
                if step == 1 and r == 0:
                    group.traffic[:] = 0
                barrier.wait()
                before = opt.compression_stats()
                t0 = time.perf_counter()
                opt.synchronize()
                with opt.skip_synchronize():
                    opt.step()
            after = opt.compression_stats()
            return {"encoded": after["bits_per_coordinate"], "strategy": after["strategy"],
                    "seconds": time.perf_counter() - t0,
                    "sent": after["bytes_sent"] - before["bytes_sent"]}

        results = group.run(work)
        traffic = group.traffic.astype(np.int64)
        node = np.arange(K) // L
        inter = [int(traffic[node == j][:, node != j].sum()) for j in range(M)]
        intra = [int(traffic[node == j][:, node == j].sum()) for j in range(M)]
        out.append({"L": L, "M": M, "K": K, "exchange": label, "coordinates": n,
                    "strategy": results[0]["strategy"],
                    "inter_node_bytes_per_node": float(np.mean(inter)),
                    "intra_node_bytes_per_node": float(np.mean(intra)),
                    "inter_node_spread": [min(inter), max(inter)],
                    "seconds_max_rank": max(r["seconds"] for r in results)})
    return out


def per_node_main(ls, ms, n: int, bits: int) -> int:
    rows = []
    t0 = time.perf_counter()
    for M in ms:
        for L in ls:
            rows += per_node_counts(L, M, n, bits)
            print(f"  L={L} M={M} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    # N b/8 as measured: one rank's whole payload (code, norms, header) from the flat allgather
    # at K = 2 ranks... taken per configuration from its own flat allgather row:
    print(f"\nbytes per node per step, fake ranks, N = {n:,} coordinates per rank, {bits}-bit "
          f"uniform levels, fixed-width code ('fixed'); formulas with N b/8 = one rank's payload "
          f"as measured (b below)")
    print(f"{'L':>2} {'M':>2} {'K':>3} {'exchange':<20} {'inter/node':>12} {'formula':>12} "
          f"{'ratio':>6} {'issue fmla':>11} {'intra/node':>12} {'formula':>12} {'x N':>7} "
          f"{'strategy':>15}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['L']:>2} {r['M']:>2} {r['K']:>3} {r['exchange']:<20} {r['skipped']}")
            continue
        ag = next(x for x in rows if x["L"] == r["L"] and x["M"] == r["M"]
                  and x["exchange"] == "flat allgather")
        # the allgather sends one whole payload to each of the K-1 other ranks
        payload = ag["inter_node_bytes_per_node"] / (r["L"] * (r["K"] - r["L"]))
        f = formulas(r["L"], r["M"], n, payload)[r["exchange"]]
        r.update(payload_bytes=payload, bits=8 * payload / n, formula_inter=f["inter"],
                 formula_intra=f["intra"], issue_formula_inter=f["issue"],
                 ratio_inter=r["inter_node_bytes_per_node"] / f["inter"])
        print(f"{r['L']:>2} {r['M']:>2} {r['K']:>3} {r['exchange']:<20} "
              f"{r['inter_node_bytes_per_node']:>12,.0f} {f['inter']:>12,.0f} "
              f"{r['ratio_inter']:>6.3f} {f['issue']:>11,.0f} "
              f"{r['intra_node_bytes_per_node']:>12,.0f} {f['intra']:>12,.0f} "
              f"{r['inter_node_bytes_per_node'] / n:>6.2f}N {r['strategy']:>15}")
    b = rows[0].get("bits")
    print(f"b (measured, one rank's payload per coordinate) = {b:.3f} bits")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "exchange_per_node.json"
    path.write_text(json.dumps({"rows": rows, "coordinates": n, "bits": bits}, indent=1))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-node", action="store_true",
                        help="bytes per node (inter and intra) on fake ranks, L x M layouts")
    parser.add_argument("--ranks-per-node", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="--per-node: L values (default 1 2 4 8)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8],
                        help="--per-node: M values (default 2 4 8)")
    parser.add_argument("--coordinates", type=int, default=1 << 17,
                        help="--per-node: N per rank, a multiple of 1024 (default 131072)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4], help="K values (default 2 3 4)")
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration (default 5)")
    parser.add_argument("--bits", type=int, default=4, help="layer-wise bits (default 4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.bits)
        return 0
    if args.per_node:
        if args.coordinates < 1024 or args.coordinates % 1024:
            parser.error(f"--coordinates must be a positive multiple of 1024, got {args.coordinates}")
        return per_node_main(args.ranks_per_node, args.nodes, args.coordinates, args.bits)

    from qoda_hvd.launcher import run_local

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ranks:
            out = os.path.join(tmp, f"k{k}.json")
            proc = run_local(k, [sys.executable, __file__, "--worker", out, "--steps", str(args.steps),
                                 "--bits", str(args.bits)], "mpirun", timeout=900,
                             capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows += json.loads(Path(out).read_text())
    d = rows[0]["coordinates"]
    print(f"bytes per rank per step, transformer block ({d:,} coordinates), {args.bits}-bit layer-wise, "
          f"median of {args.steps} steps")
    print(f"{'K':>2} {'exchange':<15} {'sent/rank':>12} {'recv/rank':>12} {'bits/coord':>10} "
          f"{'recv vs fp32':>12} {'collectives':>11}")
    for r in rows:
        fp32 = next(x for x in rows if x["K"] == r["K"] and x["strategy"] == "fp32 allreduce")
        r["received_ratio_vs_fp32"] = fp32["bytes_received_per_rank"] / r["bytes_received_per_rank"]
        print(f"{r['K']:>2} {r['strategy']:<15} {r['bytes_sent_per_rank']:>12,.0f} "
              f"{r['bytes_received_per_rank']:>12,.0f} {r['bits_per_coordinate']:>10.2f} "
              f"{r['received_ratio_vs_fp32']:>11.2f}x {r['collectives_per_step']:>11.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exchange.json").write_text(json.dumps({"rows": rows, "steps": args.steps,
                                                       "bits": args.bits}, indent=1))
    print(f"wrote {RESULTS / 'exchange.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
