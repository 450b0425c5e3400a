"""Coverage-guided fuzzing (atheris, libFuzzer) of the decoder and the exchange's receive path.

Two targets, each seeded with valid payloads of every codec (fixed, ans, elias, zstd, rans, with
and without a raw segment, several levels and bucket sizes):

- ``decode``: the public decoder, :func:`qoda_hvd.coding.decode`, both ways (``packed=False``
  and ``packed=True``), and :func:`qoda_hvd.coding.inspect_payload`;
- ``receive``: what an exchange does with a peer's bytes: :meth:`LayerwiseCodec.decode_into`
  (decode with ``packed=True``, then the unpack + dequantize kernel into the output buffers)
  and :meth:`LayerwiseCodec.check_decoded`.

The first byte of an input picks how it is fed: bit 0 set, the rest with its CRC recomputed
(so the fuzzer reaches the parser behind the checksum), else the rest as it is; bit 1 set, the
receive path expects a raw segment. The only exception
allowed is :class:`qoda_hvd.PayloadError`; anything else is a crash. A run slower than
``-timeout`` (2 s) is a hang, a process above ``-rss_limit_mb`` an over-budget allocation
(libFuzzer reports both as crashes). The numba kernels run with ``NUMBA_BOUNDSCHECK=1``, so an
out-of-bounds read or write in them raises IndexError (a crash) instead of passing silently.

After fuzzing, the corpus is replayed under coverage.py with ``NUMBA_DISABLE_JIT=1`` (the
kernels then run as Python, so their lines count) for the line coverage of
``qoda_hvd/coding/`` and ``qoda_hvd/kernels/cpu.py``. Results: ``bench/results/fuzz.json``;
corpus and crash artifacts: ``bench/results/fuzz/<target>/``.

Usage::

    nice -n 15 python bench/fuzz.py --minutes 5            # both targets, 5 minutes each
    python bench/fuzz.py --minutes 1 --target receive
    python bench/fuzz.py --replay bench/results/fuzz/decode/artifacts/crash-...   # one input

Needs the ``fuzz`` extra (``pip install -e .[fuzz]``: atheris, coverage).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGETS = ("decode", "receive")
CODINGS = ("fixed", "ans", "elias", "zstd", "rans")
MAX_NUMEL = 1 << 20      # the decode target's budget (the receive path's is its buffers' size)
HANG_S = 2               # libFuzzer -timeout: a single input slower than this is a hang
RSS_LIMIT_MB = 3072      # libFuzzer -rss_limit_mb (torch + numba alone take ~700 MB)
JIT_MODULES = ("qoda_hvd.kernels.cpu", "qoda_hvd.kernels.rng", "qoda_hvd.kernels.gpu",
               "qoda_hvd.coding.rans", "qoda_hvd.comm.buckets", "qoda_hvd.demo", "qoda_hvd.cli")
# the receive path's layout: two compressed types and a raw segment
TYPE_SIZES = (3000, 520)
RAW_NUMEL = 37


def reseal(body: bytes) -> bytes:
    """``body`` with its last 4 bytes replaced by the CRC-32 of the rest (the payload's trailer)."""
    if len(body) < 4:
        return body
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def feed(data: bytes) -> tuple[bytes, int]:
    """The payload an input stands for and its flags (the first byte, see the module docstring)."""
    if not data:
        return b"", 0
    return (reseal(data[1:]) if data[0] & 1 else data[1:]), data[0]


# ------------------------------------------------------------------------------- the targets
def make_receive_codec(bits: int = 4, bucket: int = 128, seed: int = 0):
    """A LayerwiseCodec of :data:`TYPE_SIZES` (what both the seeds and the target use)."""
    from qoda_hvd.comm.codec import LayerwiseCodec
    from qoda_hvd.quant import LayerTyping, LayerwiseQuantizer

    typing = LayerTyping({"a": 0, "b": 1}, ("dense", "embedding"), frozenset({"bias"}),
                         {"a": TYPE_SIZES[0], "b": TYPE_SIZES[1], "bias": RAW_NUMEL})
    lq = LayerwiseQuantizer(typing, bits=bits, bucket_size=bucket)
    return LayerwiseCodec(lq, list(TYPE_SIZES), rank=1, seed=seed, coding="fixed", threads=1)


def seeds_decode() -> list[tuple[int, bytes]]:
    """Valid payloads of every codec for the public decoder."""
    import numpy as np

    from qoda_hvd.coding import RawSegment, Segment, encode_bytes

    out = []
    rng = np.random.default_rng(0)
    for coding in CODINGS:
        for n, bucket, L in ((300, 64, 4), (4096, 1024, 8), (17, 16, 2), (0, 64, 4)):
            probs = rng.dirichlet(np.ones(2 * L - 1))
            s = rng.choice(np.arange(-(L - 1), L, dtype=np.int8), n, p=probs)
            seg = Segment(1, 0, n, bucket, s, rng.random(-(-n // bucket), dtype=np.float32), L)
            levels = {0: np.linspace(0, 1, L, dtype=np.float32)}
            raws = [RawSegment(9, rng.standard_normal(5).astype(np.float32))] if n % 2 == 0 else []
            out.append((0, encode_bytes([seg], levels, coding, raw=raws)))
    return out


def seeds_receive() -> list[tuple[int, bytes]]:
    """Valid payloads of every codec for the receive path, made by the exchange's own codec."""
    import torch

    out = []
    for coding in CODINGS:
        for k, scale in enumerate((1.0, 1e-3)):
            codec = make_receive_codec()
            codec.coding = coding
            torch.manual_seed(k)
            segs = [codec.quantize(t, torch.randn(n) * scale, base=0) for t, n in
                    enumerate(TYPE_SIZES)]
            raw = torch.randn(RAW_NUMEL) if k == 0 else None
            out.append((2 if raw is not None else 0, codec.encode(segs, raw).numpy().tobytes()))
    return out


def run_decode(payload: bytes, flags: int = 0) -> None:
    from qoda_hvd import PayloadError
    from qoda_hvd.coding import decode, inspect_payload

    for packed in (False, True):
        try:
            d = decode(payload, max_numel=MAX_NUMEL, packed=packed)
        except PayloadError:
            return
        for seg in d.segments:  # what a caller reads must be what the header promised
            assert seg.norms.size == -(-seg.numel // seg.bucket_size)
            if packed:
                assert seg.packed.size == -(-seg.numel * seg.width // 8)
            else:
                assert seg.symbols.size == seg.numel
                assert int(abs(seg.symbols.astype(int)).max(initial=0)) < seg.num_levels
    inspect_payload(payload, max_numel=MAX_NUMEL)  # accepted by decode: must be by inspect


_RECEIVE = {}


def run_receive(payload: bytes, flags: int = 0) -> None:
    import torch

    from qoda_hvd import PayloadError

    if not _RECEIVE:
        _RECEIVE["codec"] = make_receive_codec()
        _RECEIVE["outs"] = [torch.zeros(n) for n in TYPE_SIZES]
        _RECEIVE["raw"] = torch.zeros(RAW_NUMEL)
    codec, outs = _RECEIVE["codec"], _RECEIVE["outs"]
    tensor = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload
              else torch.zeros(0, dtype=torch.uint8))
    raw = _RECEIVE["raw"] if flags & 2 else None  # with and without a raw segment
    try:
        codec.decode_into(tensor, sender=1, outs=outs, raw_out=raw, accumulate=False, scale=0.5)
        codec.check_decoded()
    except PayloadError:
        codec.invalid = type(codec.invalid)()  # start the next round clean, as a new exchange
        return


RUNNERS = {"decode": run_decode, "receive": run_receive}
SEEDERS = {"decode": seeds_decode, "receive": seeds_receive}


def _fuzz_child(target: str, libfuzzer_args: list[str]) -> None:
    """Inside the fuzzing process: instrument qoda_hvd, then hand over to libFuzzer."""
    import atheris
    import numpy  # noqa: F401  (imported before instrumenting: only qoda_hvd is instrumented)
    import torch  # noqa: F401

    # numba compiles its kernels from their bytecode: instrumented bytecode does not compile,
    # so the modules that hold njit functions stay uninstrumented (their Python callers are)
    with atheris.instrument_imports(include=["qoda_hvd"], exclude=list(JIT_MODULES)):
        import qoda_hvd.coding  # noqa: F401
        import qoda_hvd.comm.codec  # noqa: F401
        import qoda_hvd.kernels.cpu  # noqa: F401
    runner = RUNNERS[target]
    # warm: every kernel the seeds reach is compiled (or loaded from numba's cache) before the
    # clock starts, so a first call's compile is not taken for a hang
    for flags, seed in SEEDERS[target]():
        runner(seed, flags)
        runner(seed[:-1], flags)

    def one(data: bytes) -> None:
        runner(*feed(data))

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def _numba_as_python() -> None:
    """Under ``NUMBA_DISABLE_JIT=1`` (the coverage replay), make numba's decorators plain enough
    for the kernels' module to import as Python: ``njit`` results keep a ``py_func`` (the module
    re-jits its kernels from it) and the one ``intrinsic`` (a float32 -> int32 bitcast) becomes
    the numpy bitcast. Only for line coverage: the fuzzing itself runs the compiled kernels."""
    import numba
    import numba.extending
    import numpy as np

    def _keep(f):
        f.py_func = f
        return f

    def njit(*args, **kwargs):
        if args and callable(args[0]) and not kwargs:
            return _keep(args[0])
        return _keep

    numba.njit = njit
    numba.extending.intrinsic = lambda fn: (
        lambda val: np.asarray(val, np.float32).view(np.int32)[()])


def _replay(paths: list[Path], target: str, alloc: dict | None = None) -> int:
    """Run every input file through ``target`` (under coverage when the parent asks). With
    ``alloc`` (a dict to fill), trace each input's peak host allocation (numpy's buffers and
    Python objects, via tracemalloc; the output tensors are allocated once, before) and keep the
    largest."""
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        _numba_as_python()
    runner = RUNNERS[target]
    n = 0
    if alloc is not None:
        import tracemalloc

        # a first pass untraced: the target's buffers and numba's kernels (compiled or loaded
        # on first use) are made once, not per input
        for p in paths:
            for f in (sorted(p.iterdir()) if p.is_dir() else [p]):
                runner(*feed(f.read_bytes()))
        tracemalloc.start()
    for p in paths:
        files = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in files:
            data = f.read_bytes()
            if alloc is not None:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
            runner(*feed(data))
            if alloc is not None:
                peak = tracemalloc.get_traced_memory()[1] - before
                if peak > alloc.get("peak_bytes", -1):
                    alloc.update(peak_bytes=peak, input=f.name, input_bytes=len(data))
            n += 1
    return n


# ------------------------------------------------------------------------------ orchestration
def _write_seeds(target: str, corpus: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = SEEDERS[target]()
    for i, (flags, s) in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(bytes([flags]) + s)  # valid CRC: fed as they are
    return len(seeds)


def _parse_stats(text: str) -> dict:
    stats = {}
    m = re.findall(r"Done (\d+) runs in (\d+) second", text)
    if m:
        stats["executions"], stats["seconds"] = int(m[-1][0]), int(m[-1][1])
    m = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)(?:.*?exec/s: (\d+))?"
                   r"(?:.*?rss: (\d+)Mb)?", text)
    if m:
        last = m[-1]
        stats.update(libfuzzer_cov=int(last[1]), features=int(last[2]), corpus=int(last[3]),
                     exec_per_s=int(last[5]) if last[5] else None,
                     rss_mb=int(last[6]) if last[6] else None)
        stats.setdefault("executions", int(last[0]))
    stats["deadly"] = [line for line in text.splitlines()
                       if re.search(r"ERROR: libFuzzer|==\d+== ERROR|Uncaught Python exception",
                                    line)]
    return stats


def _coverage(target: str, corpus: Path, workdir: Path) -> dict:
    data = workdir / f".coverage.{target}"
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", COVERAGE_FILE=str(data))
    include = f"{ROOT}/qoda_hvd/coding/*,{ROOT}/qoda_hvd/kernels/cpu.py"
    subprocess.run([sys.executable, "-m", "coverage", "run", f"--include={include}",
                    str(Path(__file__)), "--replay-target", target, str(corpus)],
                   env=env, check=True, cwd=ROOT, timeout=3600)
    report = workdir / f"coverage_{target}.json"
    subprocess.run([sys.executable, "-m", "coverage", "json", "-o", str(report), "-q"],
                   env=env, check=True, cwd=ROOT, timeout=600)
    files = json.loads(report.read_text())["files"]
    per = {}
    for name, f in files.items():
        s = f["summary"]
        per[os.path.relpath(name, ROOT)] = (s["covered_lines"], s["num_statements"])
    coding = [v for k, v in per.items() if k.startswith("qoda_hvd/coding/")]
    cov, tot = sum(c for c, _ in coding), sum(t for _, t in coding)
    kc, kt = per.get("qoda_hvd/kernels/cpu.py", (0, 0))
    return {"coding_lines": [cov, tot], "coding_pct": round(100 * cov / max(tot, 1), 1),
            "kernels_cpu_lines": [kc, kt], "kernels_cpu_pct": round(100 * kc / max(kt, 1), 1),
            "per_file": {k: f"{c}/{t}" for k, (c, t) in sorted(per.items())}}


def fuzz_target(target: str, seconds: int, workdir: Path, coverage: bool) -> dict:
    corpus = workdir / target / "corpus"
    artifacts = workdir / target / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = _write_seeds(target, corpus)
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", OMP_NUM_THREADS="1")
    args = [f"-max_total_time={seconds}", f"-timeout={HANG_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-max_len=65536",
            str(corpus)]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--fuzz-child", target, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=seconds + 900)
    log = proc.stdout + proc.stderr
    (workdir / target / "libfuzzer.log").write_text(log)
    stats = _parse_stats(log)
    stats.update(target=target, seeds=seeds, exit_code=proc.returncode,
                 wall_s=round(time.monotonic() - t0, 1),
                 artifacts=sorted(p.name for p in artifacts.iterdir()),
                 corpus_files=len(list(corpus.iterdir())))
    if coverage:
        stats["coverage"] = _coverage(target, corpus, workdir)
    out = subprocess.run([sys.executable, str(Path(__file__)), "--replay-target", target,
                          "--alloc", str(corpus)], cwd=ROOT, capture_output=True, text=True,
                         timeout=3600, check=True).stdout
    stats["largest_allocation"] = json.loads(out.splitlines()[-1])
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/fuzz.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="per target (default 5)")
    parser.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    parser.add_argument("--workdir", default=str(RESULTS / "fuzz"),
                        help="corpus and artifacts (default bench/results/fuzz, ignored by git)")
    parser.add_argument("--no-coverage", action="store_true", help="skip the coverage replay")
    parser.add_argument("--replay", nargs="+", default=None,
                        help="run these input files/directories through the target(s) and stop")
    parser.add_argument("--fuzz-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--replay-target", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.fuzz_child:
        _fuzz_child(args.fuzz_child, rest)
        return 0
    if args.replay_target:
        alloc = {} if "--alloc" in rest else None
        paths = [Path(p) for p in rest if p != "--alloc"]
        n = _replay(paths, args.replay_target, alloc)
        print(f"replayed {n} inputs")
        if alloc is not None:
            print(json.dumps(dict(alloc, inputs=n)))
        return 0
    targets = TARGETS if args.target == "all" else (args.target,)
    if args.replay:
        for t in targets:
            print(f"{t}: replayed {_replay([Path(p) for p in args.replay], t)} inputs, no crash")
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("bench/fuzz.py: atheris is not installed: pip install -e .[fuzz]", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    load = os.getloadavg()
    results = {"minutes_per_target": args.minutes, "load_at_start": [round(x, 1) for x in load],
               "date": time.strftime("%Y-%m-%d %H:%M"), "targets": {}}
    for t in targets:
        results["targets"][t] = fuzz_target(t, int(args.minutes * 60), workdir,
                                            not args.no_coverage)
        results["targets"][t]["load_at_end"] = [round(x, 1) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(results, indent=1))
    print("| target | minutes | executions | exec/s | corpus | crashes/hangs/OOM | coding/ lines "
          "| kernels/cpu.py lines | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for t, s in results["targets"].items():
        cov = s.get("coverage", {})
        found = s["artifacts"] + s["deadly"]
        bad += bool(found)
        print(f"| {t} | {args.minutes:g} | {s.get('executions', '?')} | {s.get('exec_per_s', '?')} "
              f"| {s.get('corpus', '?')} | {len(s['artifacts'])} {'; '.join(found)[:200]} "
              f"| {cov.get('coding_pct', '-')}% ({'/'.join(map(str, cov.get('coding_lines', [])))}) "
              f"| {cov.get('kernels_cpu_pct', '-')}% ({'/'.join(map(str, cov.get('kernels_cpu_lines', [])))}) "
              f"| {load[0]:.1f} -> {s['load_at_end'][0]:.1f} |")
    for t, s in results["targets"].items():
        a = s["largest_allocation"]
        print(f"{t}: largest traced allocation for one input {a['peak_bytes'] / 2**20:.2f} MiB "
              f"({a['input']}, {a['input_bytes']} bytes; {a['inputs']} corpus inputs replayed)")
    print(f"wrote {RESULTS / 'fuzz.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
