"""A MODEL, not a measurement: projected step time vs number of GPUs for 8-GPU nodes.

What it projects: one training step of a data-parallel job on M nodes of L = 8 GPUs (K = 8M),
M = 1..8, at 10 and 25 Gbit/s between nodes, for

- ``fp32``: NCCL's ring allreduce of the float32 gradient (what Horovod does): pipelined, so
  its time is ``2 (K-1)/K 4N`` over the slower of the inter-node link (per node) and the
  intra-node link (per GPU);
- ``flat``: our layer-wise exchange as it was before issue 23, scatter_gather over all K ranks:
  ``2 L (M-1)/M N b/8`` bytes per node cross the inter-node link; every GPU quantizes N, decodes
  2N and re-quantizes N/K coordinates;
- ``two-level``: float32 reduce-scatter and allgather inside the node (``(L-1)/L 4N`` each over
  the intra-node link), and only each GPU's shard quantized: ``2 (M-1)/M N b/8`` (M >= 3) or
  ``(M-1) N b/8`` (M = 2) bytes per node between nodes, codec work N/L per GPU; on one node
  (M = 1) it is the float32 path (``exchange="auto"`` does not compress there).

Inputs, and which are measured:

- MEASURED here (``bench/results/kernels.json`` from ``bench/bench_kernels.py`` when present,
  else the figures in bench/README.md): the codec's per-coordinate cost on one CPU core for
  quantize + pack and for unpack + dequantize + accumulate (optimal levels, 4 bits), and memcpy
  on the same core; b, the coded bits per coordinate (fixed-width 4-bit code + float32 norm per
  1024-bucket = 4.03 bits; ``--bits`` to use e.g. the measured rans figure).
- ASSUMED: the GPU runs the same kernels at the same multiple of its own memcpy time (the
  kernels are memory-bound passes; ``--gpu-memcpy-gbps``, default 1000 GB/s of copy, i.e.
  2 TB/s of HBM traffic); the intra-node link per GPU (``--intra-gbps``, default 150 GB/s:
  NVLink-class; 20 GB/s for PCIe Gen4 x16); the compute time of one step (``--compute-ms``,
  default 30 ms) and the model size (``--params``, default 23.1M, the e2e LM). Latency,
  overlap with backward and congestion are left out; links run at their line rate.

Usage::

    .venv/bin/python bench/scale.py
    .venv/bin/python bench/scale.py --intra-gbps 20 --compute-ms 60
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: bench/README.md's figures (idle 2-core VM, 2026-12-01), used when kernels.json is absent
README_NS = {"quantize": 1.47, "decode": 0.65, "memcpy": 0.266}


def measured_codec(path: Path = RESULTS / "kernels.json") -> dict:
    """Per-coordinate CPU costs (ns) of the codec's passes and memcpy, and where they came from."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return dict(README_NS, source="bench/README.md (bench_kernels, 2026-12-01)")
    rows = data["rows"]

    def pick(prefix):
        for r in rows:
            if (r.get("path") == "new" and r.get("family") == "optimal" and r.get("bits") == 4
                    and r["what"].startswith(prefix)):
                return r["ns_per_coordinate"]
        return None

    q, d = pick("quantize + pack"), pick("unpack + dequantize")
    if q is None or d is None:
        return dict(README_NS, source="bench/README.md (kernels.json lacks the optimal 4-bit rows)")
    return {"quantize": q, "decode": d, "memcpy": data["summary"]["memcpy_ns"],
            "source": f"{path.relative_to(HERE.parent)} ({data['summary']['numel']:,} coordinates)"}


def step_times(L: int, M: int, n: float, bits: float, inter_bps: float, intra_Bps: float,
               q_ns: float, d_ns: float, compute_s: float) -> dict[str, float]:
    """Seconds per step of each exchange (see the module doc for the model).

    Example::

        >>> t = step_times(8, 2, 1e6, 4.0, 10e9, 150e9, 0.01, 0.005, 0.0)
        >>> round(t["fp32"] * 1e3, 2), round(t["two-level"] * 1e3, 3)
        (6.0, 0.449)
    """
    K = L * M
    inter_Bps = inter_bps / 8
    payload = n * bits / 8
    out = {}
    if M == 1:
        fp32 = 2 * (K - 1) / K * 4 * n / intra_Bps
    else:
        fp32 = 2 * (K - 1) / K * 4 * n / min(inter_Bps, intra_Bps)
    out["fp32"] = compute_s + fp32
    # flat scatter_gather over all K ranks
    flat_wire = 2 * L * (M - 1) / M * payload / inter_Bps + 2 * (L - 1) / K * payload / intra_Bps
    flat_codec = (q_ns * n * (1 + 1 / K) + d_ns * 2 * n) * 1e-9
    out["flat"] = compute_s + flat_wire + flat_codec
    # two-level
    node = 2 * (L - 1) / L * 4 * n / intra_Bps
    if M == 1:
        out["two-level"] = compute_s + node
    else:
        shard = n / L
        if M == 2:
            cross = (M - 1) * payload / inter_Bps
            codec = (q_ns * shard + d_ns * M * shard) * 1e-9
        else:
            cross = 2 * (M - 1) / M * payload / inter_Bps
            codec = (q_ns * shard * (1 + 1 / M) + d_ns * 2 * shard) * 1e-9
        out["two-level"] = compute_s + node + cross + codec
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=23.1e6, help="gradient coordinates N")
    parser.add_argument("--compute-ms", type=float, default=30.0,
                        help="ASSUMED compute time of one step on one GPU (ms)")
    parser.add_argument("--gpu-memcpy-gbps", type=float, default=1000.0,
                        help="ASSUMED GPU memcpy rate, GB/s of data copied (default 1000)")
    parser.add_argument("--intra-gbps", type=float, default=150.0,
                        help="ASSUMED intra-node bandwidth per GPU, GB/s (NVLink ~150, PCIe ~20)")
    parser.add_argument("--bits", type=float, default=4.0 + 32 / 1024,
                        help="coded bits per coordinate (default 4-bit fixed code + norms)")
    parser.add_argument("--links", nargs="+", type=float, default=[10.0, 25.0],
                        help="inter-node Gbit/s (default 10 25)")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=8)
    args = parser.parse_args(argv)

    cpu = measured_codec()
    gpu_memcpy_ns = 8 / args.gpu_memcpy_gbps  # ns per float32 coordinate: read 4 B + write 4 B
    scale = gpu_memcpy_ns / cpu["memcpy"]
    q_ns, d_ns = cpu["quantize"] * scale, cpu["decode"] * scale
    L, n = args.ranks_per_node, args.params
    print("A MODEL, not a measurement (bench/scale.py; see its docstring).")
    print(f"  measured (CPU, one core; {cpu['source']}): quantize+pack {cpu['quantize']:.2f} ns, "
          f"decode {cpu['decode']:.2f} ns, memcpy {cpu['memcpy']:.3f} ns per coordinate")
    print(f"  assumed GPU: the same multiples of memcpy at {args.gpu_memcpy_gbps:g} GB/s copy -> "
          f"quantize+pack {q_ns * 1e3:.1f} ps, decode {d_ns * 1e3:.1f} ps per coordinate")
    print(f"  assumed: N = {n / 1e6:.1f}M coordinates, compute {args.compute_ms:g} ms/step, "
          f"intra-node {args.intra_gbps:g} GB/s per GPU, b = {args.bits:.2f} bits, no overlap, "
          f"no latency")
    rows = []
    for gbit in args.links:
        print(f"\ninter-node {gbit:g} Gbit/s, {L} GPUs per node: ms per step and speedup vs fp32")
        print(f"{'GPUs':>5} {'nodes':>5} {'fp32':>8} {'flat':>8} {'2-level':>8} "
              f"{'flat x':>7} {'2-level x':>9}")
        for M in range(1, args.max_nodes + 1):
            t = step_times(L, M, n, args.bits, gbit * 1e9, args.intra_gbps * 1e9, q_ns, d_ns,
                           args.compute_ms / 1e3)
            row = {"link_gbit": gbit, "gpus": L * M, "nodes": M, **{k: v for k, v in t.items()},
                   "speedup_flat": t["fp32"] / t["flat"],
                   "speedup_two_level": t["fp32"] / t["two-level"]}
            rows.append(row)
            print(f"{L * M:>5} {M:>5} {t['fp32'] * 1e3:>8.1f} {t['flat'] * 1e3:>8.1f} "
                  f"{t['two-level'] * 1e3:>8.1f} {row['speedup_flat']:>6.2f}x "
                  f"{row['speedup_two_level']:>8.2f}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "scale.json"
    path.write_text(json.dumps({"model": True, "assumptions": vars(args), "cpu_measured": cpu,
                                "gpu_ns": {"quantize": q_ns, "decode": d_ns}, "rows": rows},
                               indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
