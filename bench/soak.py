"""Soak: the examples' transformer LM at quick size on 2 ranks for a time budget; leaks?

Runs ``mpirun -np 2 examples/transformer_lm.py`` (layer-wise compression, the example's
defaults otherwise) with the quick model of ``bench/quality_lm.py --quick`` (d 32, 1 block,
sequence 32, batch 4, 400k characters of text) for ``--minutes``, with a metrics row every
100 steps. Each time a row appears, each rank's resident memory (``VmRSS``), thread count and
open file descriptors are read from ``/proc``. Growth is measured from the first sample at or
after step 200 (warm-up: numba kernels loaded, level tables adapted, allocator pools filled) to
the last sample. Goal: RSS growth < 2%, no thread or descriptor growth.

The job is stopped (SIGTERM to its process group) when the budget is spent. Results: a table on
stdout and ``bench/results/soak.json``.

Usage::

    nice -n 15 python bench/soak.py --minutes 8
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EVERY = 100
WARMUP = 200


def _rank_pids(marker: str) -> dict[int, int]:
    """``{rank: pid}`` of the job's rank processes (their command line holds ``marker``)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if not any(marker.encode() in c for c in cmd) or b"mpirun" in Path(
                    cmd[0].decode(errors="replace")).name.encode():
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0")
                       if b"=" in kv)
            rank = env.get(b"OMPI_COMM_WORLD_RANK")
            if rank is not None and b"transformer_lm.py" in b" ".join(cmd):
                out[int(rank)] = int(d.name)
        except (OSError, ValueError):
            continue
    return out


def sample(pid: int) -> dict | None:
    """RSS (KiB), threads and open descriptors of a process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return None


def growth(samples: list[dict]) -> dict:
    """Growth of each rank from its first sample at step >= WARMUP to its last."""
    out = {}
    ranks = sorted({r for s in samples for r in s["ranks"]})
    for r in ranks:
        seq = [(s["step"], s["ranks"][r]) for s in samples if s["ranks"].get(r)]
        after = [(st, v) for st, v in seq if st >= WARMUP]
        if len(after) < 2:
            continue
        (s0, a), (s1, b) = after[0], after[-1]
        out[r] = {"from_step": s0, "to_step": s1,
                  "rss_mib": [round(a["rss_kib"] / 1024, 1), round(b["rss_kib"] / 1024, 1)],
                  "rss_growth_pct": round(100 * (b["rss_kib"] - a["rss_kib"]) / a["rss_kib"], 2),
                  "rss_max_mib": round(max(v["rss_kib"] for _, v in after) / 1024, 1),
                  "threads": [a["threads"], b["threads"]],
                  "threads_max": max(v["threads"] for _, v in after),
                  "fds": [a["fds"], b["fds"]], "fds_max": max(v["fds"] for _, v in after)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget (default 8)")
    parser.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = parser.parse_args(argv)

    from qoda_hvd.launcher import local_command, rank_environment

    work = Path(tempfile.mkdtemp(prefix="qoda-soak-"))
    argv_rank = [sys.executable, str(ROOT / "examples" / "transformer_lm.py"),
                 "--steps", "10000000", "--batch", "4", "--d-model", "32", "--heads", "2",
                 "--layers", "1", "--d-ff", "64", "--seq-len", "32", "--max-chars", "400000",
                 "--eval-batches", "4", "--sample-tokens", "0", "--log-every", str(EVERY),
                 "--save-every", "100000000", "--out", str(work)]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.Popen(local_command(2, argv_rank, "mpirun"), env=rank_environment(None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    samples, seen, pids = [], 0, {}
    metrics = work / "metrics.csv"
    deadline = t0 + args.minutes * 60
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if len(pids) < 2:
                pids = _rank_pids(str(work))
            if not metrics.exists():
                continue
            with open(metrics, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step")]
            if len(rows) > seen:
                seen = len(rows)
                step = int(rows[-1]["step"])
                samples.append({"step": step, "t": round(time.time() - t0, 1),
                                "load": round(os.getloadavg()[0], 1),
                                "ranks": {r: sample(p) for r, p in sorted(pids.items())}})
                print(json.dumps(samples[-1]), flush=True)
    finally:
        ended_itself = proc.poll() is not None
        if not ended_itself:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "minutes": args.minutes,
              "steps": samples[-1]["step"] if samples else 0,
              "load_at_start": round(load0, 1), "load_at_end": round(os.getloadavg()[0], 1),
              "job_ended_by_itself": ended_itself,
              "stderr_tail": (err or "")[-2000:] if ended_itself else "",
              "growth": growth(samples), "samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| rank | steps sampled | RSS MiB (first -> last) | RSS growth | threads | fds | "
          "load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for r, g in result["growth"].items():
        print(f"| {r} | {g['from_step']}..{g['to_step']} | {g['rss_mib'][0]} -> {g['rss_mib'][1]} "
              f"(max {g['rss_max_mib']}) | {g['rss_growth_pct']}% | {g['threads'][0]} -> "
              f"{g['threads'][1]} (max {g['threads_max']}) | {g['fds'][0]} -> {g['fds'][1]} "
              f"(max {g['fds_max']}) | {result['load_at_start']} -> {result['load_at_end']} |")
    if ended_itself:
        print("the job ended before the budget:\n" + result["stderr_tail"], file=sys.stderr)
    print(f"wrote {args.out}")
    return 0 if result["growth"] else 1


if __name__ == "__main__":
    sys.exit(main())
