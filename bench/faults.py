"""What a training job does when the cluster misbehaves, measured on the emulated cluster.

Each scenario runs ONE small training job (a 3-layer MLP, ~85k parameters, SGD, a few dozen
steps) on 2 emulated nodes (:class:`qoda_hvd.cluster.EmulatedCluster`, 1 Gbit/s links, one
rank per node, ``mpirun``) for each of two optimizers, one after the other:

- ``ours``: ``qoda_hvd.DistributedOptimizer`` with layer-wise 4-bit compression (overlap on,
  the default);
- ``fp32``: ``horovod.torch.DistributedOptimizer`` (fp32 allreduce).

Scenarios (faults on node 1's link, both directions, or on rank 1's process):

- ``clean``: no fault (the reference for the slowdowns);
- ``loss1`` / ``loss5``: 1% / 5% of the packets dropped for the whole run
  (:meth:`EmulatedCluster.impair`: cls_bpf + mirred, as ``netem loss`` would);
- ``latency``: 20 ms added latency with 5 ms jitter (``netem delay 20ms 5ms``): needs the
  kernel's ``sch_netem``; reported as not run, with the reason, where the kernel lacks it;
- ``flap``: the link down for 3 s mid-run (100% loss, then restored);
- ``stop``: rank 1 stopped with SIGSTOP for 10 s mid-run, then SIGCONT; the CPU rank 0 burns
  while it waits, per thread; ``stop_gloo``: the same under ``horovodrun --gloo`` (loopback);
- ``kill``: rank 1 killed with SIGKILL mid-run (no elastic): every rank must end, non-zero,
  within a bounded time, with a message naming the failure; also under ``horovodrun --gloo``
  (on this machine's loopback: ``horovodrun`` reaches hosts over ssh, which the emulated nodes
  do not run, and a kill needs no shaped link);
- ``partition``: node 1's link down for good mid-run (a node that vanished without closing its
  connections): does anything end the job? Run with Horovod's stall inspector set to shut down
  (:data:`STALL_ENV`); the job timeout bounds the wait otherwise;
- ``elastic``: the same kill under Horovod Elastic with 3 workers (``horovodrun --gloo
  --min-np 2``, examples/elastic.py with ``ours`` and ``fp32`` side by side, launched as
  tests/test_elastic.py does): the survivors roll back to the last commit and finish.

For each: did the job finish, are the ranks' parameters bit-identical, the slowdown against the
clean run (rank 0's steady training time: from the end of step 2 to the last step; the elastic
rows compare whole jobs), the longest step, how long until a failure surfaced
(the kill: from SIGKILL to the last rank gone and the launcher's exit), and what the user saw.
The machine is shared: the 1-minute load average is printed beside every figure.

Usage (root; skips with the reason otherwise)::

    nice -n 15 python bench/faults.py                      # every scenario
    python bench/faults.py --scenarios clean,loss1,stop --steps 40

Results: a markdown table on stdout and ``bench/results/faults.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("clean", "loss1", "loss5", "latency", "flap", "stop", "stop_gloo", "kill", "kill_gloo",
             "elastic", "partition")
#: The partition scenario's Horovod stall settings: a warning after 5 s, shut down after 20 s.
STALL_ENV = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "20"}
METHODS = ("ours", "fp32")
JOB_TIMEOUT = 420.0      # seconds: a job still running then is reported as hung and killed
FAULT_AT = 0.4           # the fault starts when rank 1 reaches this fraction of the steps


# ------------------------------------------------------------------------------------ worker
def worker(args) -> int:
    """One rank: train ``args.steps`` steps, log each step, write the parameters' digest."""
    import horovod.torch as hvd
    import torch
    from torch import nn

    import qoda_hvd

    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()
    log = open(Path(args.log_dir) / f"rank{rank}.jsonl", "a", buffering=1)
    log.write(json.dumps({"rank": rank, "pid": os.getpid(), "start": time.time()}) + "\n")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if args.method == "ours":
        opt = qoda_hvd.DistributedOptimizer(
            base, named_parameters=model.named_parameters(),
            compression=qoda_hvd.Compression.layerwise(bits=4, seed=1))
    else:
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(1000 + rank)
    t0 = time.time()
    for step in range(args.steps):
        x = torch.randn(64, 64, generator=g)
        y = (x[:, :10] * 2 + x[:, 10:20]).argmax(dim=1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        log.write(json.dumps({"step": step, "t": time.time()}) + "\n")
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    log.write(json.dumps({"done": True, "train_s": time.time() - t0, "digest": h.hexdigest(),
                          "end": time.time()}) + "\n")
    hvd.shutdown()
    return 0


# ------------------------------------------------------------------------------ orchestration
def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _records(log_dir: Path, rank: int) -> list[dict]:
    path = log_dir / f"rank{rank}.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _last_step(log_dir: Path, rank: int) -> int:
    steps = [r["step"] for r in _records(log_dir, rank) if "step" in r]
    return max(steps) if steps else -1


def _pid(log_dir: Path, rank: int) -> int | None:
    for r in _records(log_dir, rank):
        if "pid" in r:
            return r["pid"]
    return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds of each thread of a process, summed by thread name (``comm``; unnamed threads
    as the main thread and the others: Horovod's background thread and ours are unnamed)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (OSError, TypeError):
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        if name == "python" or name.startswith("python3"):  # unnamed: main or not is what tells
            name = "main thread" if int(tid) == int(pid) else "other python threads"
        fields = text[text.rindex(")") + 1:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK")
    return out


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (its threads included), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().split(")")[-1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return None


def _message(text: str) -> str:
    """The lines that tell a user what went wrong (launcher and Horovod errors), shortened."""
    keep = []
    for line in text.splitlines():
        if re.search(r"noticed|exited on signal|Killed|error|Error|terminat|abort|Traceback|"
                     r"HorovodInternalError|connection|Connection|timed out|timeout", line):
            line = line.strip()
            if line and line not in keep:
                keep.append(line)
    return " | ".join(keep)[:600]


def _inject(scenario: str, cluster, log_dir: Path, steps: int, proc: subprocess.Popen,
            info: dict) -> None:
    """Wait for rank 1 to reach the fault step, then do the scenario's fault."""
    at = max(1, int(steps * FAULT_AT))
    while _last_step(log_dir, 1) < at:
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    info["fault_step"] = _last_step(log_dir, 1)
    info["fault_t"] = time.time()
    info["load_at_fault"] = _load()
    pid = _pid(log_dir, 1)
    survivor = _pid(log_dir, 0)
    cpu0 = _cpu_seconds(survivor)
    threads0 = _thread_cpu(survivor)
    if scenario == "partition":
        cluster.impair(1, 1.0)
        while _alive(survivor) and proc.poll() is None:
            time.sleep(0.1)
        info["rank0_gone_s"] = round(time.time() - info["fault_t"], 2)
    elif scenario == "flap":
        cluster.impair(1, 1.0)
        time.sleep(3.0)
        cluster.impair(1, 0.0)
    elif scenario == "stop":
        os.kill(pid, signal.SIGSTOP)
        time.sleep(info.get("stop_s", 10.0))
        os.kill(pid, signal.SIGCONT)
    elif scenario == "stop_gloo":
        os.kill(pid, signal.SIGSTOP)
        time.sleep(info.get("stop_s", 10.0))
        os.kill(pid, signal.SIGCONT)
    if scenario in ("flap", "stop", "stop_gloo") and cpu0 is not None:
        # what rank 0 burnt while it waited (a progress thread spinning on a stopped peer shows)
        cpu1 = _cpu_seconds(survivor)
        if cpu1 is not None:
            info["rank0_cpu_pct_during_fault"] = round(
                100 * (cpu1 - cpu0) / (time.time() - info["fault_t"]), 1)
            spent = time.time() - info["fault_t"]
            threads1 = _thread_cpu(survivor)
            info["rank0_cpu_pct_by_thread"] = {
                k: round(100 * (v - threads0.get(k, 0.0)) / spent, 1)
                for k, v in threads1.items() if v - threads0.get(k, 0.0) > 0.005 * spent}
    elif scenario in ("kill", "kill_gloo"):
        os.kill(pid, signal.SIGKILL)
        while _alive(survivor) and proc.poll() is None:
            time.sleep(0.05)
        info["rank0_gone_s"] = round(time.time() - info["fault_t"], 2)


def _summarise(scenario: str, method: str, log_dir: Path, proc_rc, out: str, info: dict,
               t_start: float, t_end: float, ranks: int = 2) -> dict:
    recs = {r: _records(log_dir, r) for r in range(ranks)}
    done = {r: next((x for x in recs[r] if x.get("done")), None) for r in range(ranks)}
    finished = all(done.values()) and proc_rc == 0
    digests = {d["digest"] for d in done.values() if d}
    times = [x["t"] for x in recs[0] if "step" in x]
    gaps = [b - a for a, b in zip(times, times[1:])]
    row = {"scenario": scenario, "method": method, "finished": finished, "exit_code": proc_rc,
           "bit_identical": (len(digests) == 1 and all(done.values())) if finished else None,
           "train_s": round(done[0]["train_s"], 2) if done[0] else None,
           # steady part: from the end of step 2 to the last step (the first steps load kernels)
           "steady_s": round(times[-1] - times[1], 2) if finished and len(times) > 2 else None,
           "longest_step_s": round(max(gaps), 2) if gaps else None,
           "median_step_s": round(sorted(gaps)[len(gaps) // 2], 3) if gaps else None,
           "steps_done_rank0": (max((x["step"] for x in recs[0] if "step" in x), default=-1) + 1),
           "wall_s": round(t_end - t_start, 1), "load": info.get("load_at_fault", _load()),
           "load_at_end": _load()}
    for k in ("fault_step", "rank0_gone_s", "stop_s", "rank0_cpu_pct_during_fault",
              "rank0_cpu_pct_by_thread"):
        if k in info:
            row[k] = info[k]
    if "fault_t" in info and (scenario.startswith("kill") or scenario == "partition"
                              or not finished):
        row["job_end_s"] = round(t_end - info["fault_t"], 2)
    if not finished:
        row["message"] = _message(out)
    return row


def run_emulated(scenario: str, method: str, steps: int, *, stop_s: float = 10.0,
                 loss: float | None = None, timeout: float = JOB_TIMEOUT) -> dict:
    """One job of ``method`` on 2 emulated nodes with ``scenario``'s fault (and, with ``loss``,
    that fraction of node 1's packets dropped for the whole run on top of it)."""
    import threading

    from qoda_hvd.cluster.emulator import EmulatedCluster

    log_dir = Path(tempfile.mkdtemp(prefix=f"faults-{scenario}-{method}-"))
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method,
            "--steps", str(steps), "--log-dir", str(log_dir)]
    info: dict = {"stop_s": stop_s} if scenario == "stop" else {}
    with EmulatedCluster(nodes=2, bandwidth="1gbit") as cluster:
        if scenario in ("loss1", "loss5"):
            loss = 0.01 if scenario == "loss1" else 0.05
        if loss:
            cluster.impair(1, loss)
        env = cluster.environment()
        mpi_args: list[str] = []
        if scenario == "partition":
            env.update(STALL_ENV)
            mpi_args = [w for k in STALL_ENV for w in ("-x", k)]
        cmd = cluster.mpirun_command(argv, mpi_args=mpi_args)
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                start_new_session=True)
        injector = None
        if scenario in ("flap", "stop", "kill", "partition"):
            injector = threading.Thread(target=_inject, daemon=True,
                                        args=(scenario, cluster, log_dir, steps, proc, info))
            injector.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc = "hung (killed at the job timeout)"
        t1 = time.time()
        if injector is not None:
            injector.join(timeout=30)
    (log_dir / "launcher.out").write_text(out or "")
    row = _summarise(scenario, method, log_dir, rc, out or "", info, t0, t1)
    row["log_dir"] = str(log_dir)
    return row


def run_gloo(scenario: str, method: str, steps: int, *, stop_s: float = 10.0,
             timeout: float = JOB_TIMEOUT) -> dict:
    """``kill_gloo`` / ``stop_gloo``: the fault under ``horovodrun --gloo -np 2`` on this
    machine (loopback)."""
    import threading

    from qoda_hvd.launcher import local_command, rank_environment

    log_dir = Path(tempfile.mkdtemp(prefix=f"faults-{scenario}-{method}-"))
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method,
            "--steps", str(steps), "--log-dir", str(log_dir)]
    info: dict = {"stop_s": stop_s} if scenario == "stop_gloo" else {}
    t0 = time.time()
    proc = subprocess.Popen(local_command(2, argv, "gloo"), env=rank_environment(None),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    injector = threading.Thread(target=_inject, daemon=True,
                                args=(scenario, None, log_dir, steps, proc, info))
    injector.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "hung (killed at the job timeout)"
    t1 = time.time()
    injector.join(timeout=30)
    (log_dir / "launcher.out").write_text(out or "")
    row = _summarise(scenario, method, log_dir, rc, out or "", info, t0, t1)
    row["log_dir"] = str(log_dir)
    return row


def run_elastic(steps: int, kill: bool, timeout: float = JOB_TIMEOUT,
                gloo_timeout: int | None = None) -> dict:
    """examples/elastic.py with ours and fp32 side by side, 3 workers, rank 2 killed (or not);
    ``gloo_timeout``: ``horovodrun --gloo-timeout-seconds`` (None: Horovod's default, 30 s)."""
    import torch

    hosts = ["localhost", "127.0.0.1", socket.gethostname()]
    work = Path(tempfile.mkdtemp(prefix="faults-elastic-"))
    (work / "hosts.txt").write_text("".join(f"{h}:1\n" for h in hosts))
    discover = work / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat '{work / 'hosts.txt'}'\n")
    discover.chmod(0o755)
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    commit_every, kill_at = 4, max(5, steps // 2 + 1)
    cmd = [horovodrun, "--gloo", "-np", "3", "--min-np", "2", "--max-np", "3",
           *([] if gloo_timeout is None else ["--gloo-timeout-seconds", str(gloo_timeout)]),
           "--host-discovery-script", str(discover), sys.executable,
           str(ROOT / "examples" / "elastic.py"), "--log-dir", str(work / "logs"),
           "--out", str(work / "out"), "--config", "ours:sgd:layerwise", "--config",
           "fp32:sgd:none", "--steps", str(steps), "--commit-every", str(commit_every)]
    if kill:
        cmd += ["--kill-at-step", str(kill_at), "--kill-rank", "2", "--kill-size", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    load = _load()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "hung (killed at the job timeout)"
    t1 = time.time()
    (work / "launcher.out").write_text(out or "")
    finals = [torch.load(p, weights_only=False) for p in sorted((work / "out").glob("rank*.pt"))]
    records = []
    for path in sorted((work / "logs").glob("pid*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    steps_recs = [r for r in records if "step" in r]
    finished = rc == 0 and len(finals) == (2 if kill else 3) and all(
        f["step"] == steps for f in finals)
    identical = None
    if finals:
        identical = all(torch.equal(a, b) for f in finals[1:] for name in finals[0]["params"]
                        for a, b in zip(finals[0]["params"][name], f["params"][name]))
    row = {"scenario": ("elastic" if kill else "elastic_clean") + (
               "" if gloo_timeout is None else f"_gloo{gloo_timeout}s"), "method": "ours+fp32",
           "finished": finished, "exit_code": rc, "bit_identical": identical,
           "survivors": len(finals), "wall_s": round(t1 - t0, 1), "load": load,
           "load_at_end": _load()}
    before = [r["time"] for r in steps_recs if r["size"] == 3]
    after = [r["time"] for r in steps_recs if r["size"] == 2]
    if kill and before and after:
        # the worker died right after its peers' last 3-worker step; recovery: the first step
        # of the 2-worker ring (rolled back to the last commit)
        row["recovered_after_s"] = round(min(after) - max(before), 2)
        row["resumed_at_step"] = min(r["step"] for r in steps_recs if r["size"] == 2)
        row["fault_step"] = kill_at
    if not finished:
        row["message"] = _message(out)
    else:
        row["message"] = _message("\n".join(
            line for line in out.splitlines() if re.search(r"(?i)fail|remov|blacklist|reset|"
                                                           r"exit", line)))[:300]
    row["log_dir"] = str(work)
    return row


def _netem_reason() -> str | None:
    from qoda_hvd.cluster.emulator import netem_available

    if netem_available():
        return None
    return ("not run: this kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set), and "
            "neither sch_fq (for EDT delays) nor act_gact: no added latency or jitter can be "
            "emulated here")


def run_latency(method: str, steps: int) -> dict:
    reason = _netem_reason()
    if reason is not None:
        return {"scenario": "latency", "method": method, "finished": None, "message": reason,
                "load": _load()}
    from qoda_hvd.cluster.emulator import EmulatedCluster  # pragma: no cover (needs netem)

    # 20 ms one-way between the nodes with 5 ms jitter: netem on node 1's link, both ways
    log_dir = Path(tempfile.mkdtemp(prefix=f"faults-latency-{method}-"))
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method,
            "--steps", str(steps), "--log-dir", str(log_dir)]
    with EmulatedCluster(nodes=2, bandwidth="1gbit", delay="20ms") as cluster:
        for ns, dev in ((cluster.nodes[1].namespace, "eth0"), (cluster.switch_namespace, "p1")):
            subprocess.run(["tc", "-n", ns, "qdisc", "change", "dev", dev, "parent", "1:1",
                            "handle", "10:", "netem", "delay", "10ms", "2500us"], check=True)
        t0 = time.time()
        proc = subprocess.run(cluster.mpirun_command(argv), env=cluster.environment(),
                              capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=ROOT)
        t1 = time.time()
    return _summarise("latency", method, log_dir, proc.returncode, proc.stdout + proc.stderr,
                      {}, t0, t1)


def _fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x}{unit}"


def table(rows: list[dict]) -> str:
    clean = {r["method"]: r.get("steady_s") for r in rows if r["scenario"] == "clean"}
    clean_el = next((r["wall_s"] for r in rows if r["scenario"] == "elastic_clean"), None)
    lines = ["| scenario | optimizer | finished | ranks bit-identical | slowdown vs clean | longest "
             "step | failure surfaced after | load (1 min) | what the user saw |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        el = r["scenario"].startswith("elastic")
        base = clean_el if el else clean.get(r["method"])
        ref = r.get("wall_s") if el else r.get("steady_s")
        slow = f"{ref / base:.2f}x (+{ref - base:.1f} s)" if (base and ref and r.get("finished")
                                        and "clean" not in r["scenario"]) else "-"
        if r["scenario"].startswith("kill") or r["scenario"] == "partition":
            surfaced = (f"rank 0 gone {r.get('rank0_gone_s', '-')} s, launcher exit "
                        f"{r.get('job_end_s', '-')} s after the "
                        f"{'SIGKILL' if r['scenario'] != 'partition' else 'link went down'}")
        elif el and "recovered_after_s" in r:
            surfaced = (f"2-worker ring training {r['recovered_after_s']} s after the last "
                        f"3-worker step (resumed at step {r['resumed_at_step']})")
        elif not r.get("finished") and "job_end_s" in r:
            surfaced = f"launcher exit {r['job_end_s']} s after the fault began"
        elif "rank0_cpu_pct_during_fault" in r:
            top = sorted(r.get("rank0_cpu_pct_by_thread", {}).items(), key=lambda kv: -kv[1])[:2]
            surfaced = (f"no failure; rank 0 used {r['rank0_cpu_pct_during_fault']}% of a core "
                        f"meanwhile" + (f" ({', '.join(f'{k} {v}%' for k, v in top)})"
                                        if top else ""))
        else:
            surfaced = "-"
        lines.append(
            f"| {r['scenario']} | {r['method']} | {_fmt(r.get('finished'))}"
            f"{'' if r.get('finished') in (True, None) else ' (exit ' + str(r.get('exit_code')) + ')'}"
            f" | {_fmt(r.get('bit_identical'))} | {slow} | {_fmt(r.get('longest_step_s'), ' s')} "
            f"| {surfaced} | {r.get('load', '-')} | {(r.get('message') or '').replace('|', '/')[:260]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/faults.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="ours, fp32 or both")
    parser.add_argument("--steps", type=int, default=40, help="training steps per job")
    parser.add_argument("--stop-seconds", type=float, default=10.0, help="SIGSTOP length")
    parser.add_argument("--elastic-steps", type=int, default=16)
    parser.add_argument("--gloo-timeout", type=int, default=None,
                        help="elastic: also run the kill with horovodrun --gloo-timeout-seconds N")
    parser.add_argument("--timeout", type=float, default=JOB_TIMEOUT,
                        help=f"seconds before a job counts as hung (default {JOB_TIMEOUT:g})")
    parser.add_argument("--out", default=str(RESULTS / "faults.json"))
    parser.add_argument("--table-from", default=None,
                        help="print the table of an earlier run's JSON (steady times recomputed "
                             "from its jobs' logs when they are still there) and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.table_from:
        rows = json.loads(Path(args.table_from).read_text())["rows"]
        for r in rows:
            times = [x["t"] for x in _records(Path(r.get("log_dir", "/nonexistent")), 0)
                     if "step" in x]
            if r.get("finished") and r.get("steady_s") is None and len(times) > 2:
                r["steady_s"] = round(times[-1] - times[1], 2)
        print(table(rows))
        return 0

    from qoda_hvd.cluster.emulator import emulator_unavailable_reason

    reason = emulator_unavailable_reason()
    if reason is not None:
        print(f"bench/faults.py: skipped: {reason}")
        return 0
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for sc in scenarios:
        for method in (methods if sc != "elastic" else ["ours+fp32"]):
            print(f"== {sc} / {method} (load {_load()}) ==", flush=True)
            if sc == "latency":
                row = run_latency(method, args.steps)
            elif sc in ("kill_gloo", "stop_gloo"):
                row = run_gloo(sc, method, args.steps, stop_s=args.stop_seconds,
                               timeout=args.timeout)
            elif sc == "elastic":
                if args.gloo_timeout is None:
                    rows.append(run_elastic(args.elastic_steps, kill=False, timeout=args.timeout))
                    print(json.dumps(rows[-1]), flush=True)
                row = run_elastic(args.elastic_steps, kill=True, timeout=args.timeout,
                                  gloo_timeout=args.gloo_timeout)
            else:
                row = run_emulated(sc, method, args.steps, stop_s=args.stop_seconds,
                                   timeout=args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                          "steps": args.steps, "rows": rows}, indent=1))
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
