"""Bytes on the wire per rank per step vs the number of ranks K, for each exchange.

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
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4], help="K values (default 2 3 4)")
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration (default 5)")
    parser.add_argument("--bits", type=int, default=4, help="layer-wise bits (default 4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.bits)
        return 0

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
