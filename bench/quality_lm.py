"""Quality benchmark: a byte-level LM on the Python standard library's own source, 2 ranks.

The text ships with every Python install: the ``.py`` files under ``sysconfig``'s ``stdlib``
directory (``site-packages`` excluded), split by FILE into training and validation (a file is
held out when ``crc32(relative path) % 10 == 0``, about 10% of the files), read as bytes
(vocabulary 256). A small pre-norm transformer LM is trained for a fixed number of steps on 2
ranks (real Horovod under ``mpirun``), every method from the same initial weights on the same
batches, with Adam through ``qoda_hvd.DistributedOptimizer``:

- ``fp32``: ``Compression.none`` (one fused float32 allreduce);
- ``quant4``: ``Compression.layerwise(bits=4)``, layer-wise quantization (types from the model);
- ``global_rR``: ``Compression.powersgd(rank=R)``, one rank everywhere;
- ``layerwise_rR``: ``Compression.powersgd(rank=R, layerwise=True)``: per layer type, ranks by
  L-GreCo's DP under the error budget of rank R everywhere (re-run every ``--every`` steps).

Reported per method: validation loss (nats/byte) and perplexity at the end, bytes this rank
sent per step (logical, counted by the communicator), the compression ratio against fp32's
bytes, and the per-type ranks. Then the paper's table analog (QODA Transformer-XL: layer-wise
1.47-1.52x the global compression ratio at equal perplexity): for each R, the layer-wise ratio
over the global one, and over the best global ratio whose loss is no better than the layer-wise
run's ("at equal or better loss").

Usage::

    .venv/bin/python bench/quality_lm.py                 # ~3-4 min on 2 CPU cores
    .venv/bin/python bench/quality_lm.py --steps 100 --ranks 4   # a smoke run

Writes ``bench/results/quality_lm.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results"


# ------------------------------------------------------------------------------------ data
def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files (no ``site-packages``), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(f.parts))
    return root, files


def is_validation(relative: str) -> bool:
    """Held-out files: ``crc32(relative path) % 10 == 0`` (stable across machines)."""
    return zlib.crc32(relative.encode()) % 10 == 0


def load_corpus(max_train: int, max_valid: int):
    """``(train, valid, description)`` as uint8 tensors, files concatenated in sorted order."""
    import torch

    root, files = stdlib_files()
    parts = {True: [], False: []}
    sizes = {True: 0, False: 0}
    counts = {True: 0, False: 0}
    caps = {True: max_valid, False: max_train}
    for f in files:
        rel = f.relative_to(root).as_posix()
        held = is_validation(rel)
        if sizes[held] >= caps[held]:
            continue
        data = f.read_bytes() + b"\n"
        parts[held].append(data)
        sizes[held] += len(data)
        counts[held] += 1
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    desc = (f"{root} (.py, site-packages excluded): {counts[False]} training files "
            f"({sizes[False]:,} bytes), {counts[True]} validation files ({sizes[True]:,} bytes), "
            f"split by crc32(path) % 10 == 0")
    return as_tensor(parts[False]), as_tensor(parts[True]), desc


# ----------------------------------------------------------------------------------- model
def build_model(d: int, heads: int, layers: int, d_ff: int, seq: int):
    import torch
    from torch import nn

    class ByteLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, d)
            self.pos_embed = nn.Embedding(seq, d)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(d, heads, d_ff, 0.0, batch_first=True, norm_first=True)
                for _ in range(layers))
            self.norm = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, 256, bias=False)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq),
                                 persistent=False)

        def forward(self, idx):
            n = idx.shape[1]
            h = self.embed(idx) + self.pos_embed.weight[:n]
            for block in self.blocks:
                h = block(h, src_mask=self.mask[:n, :n], is_causal=True)
            return self.lm_head(self.norm(h))

    return ByteLM()


def windows(tokens, batch: int, seq: int, generator):
    import torch

    start = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(seq + 1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------- worker
def make_compression(name: str, model, cfg: dict):
    import qoda_hvd

    if name == "fp32":
        return qoda_hvd.Compression.none
    if name == "quant4":
        return qoda_hvd.Compression.layerwise(bits=4, types=model, min_numel=cfg["min_numel"])
    kind, rank = name.split("_r")
    return qoda_hvd.Compression.powersgd(rank=int(rank), types=model,
                                         layerwise=kind == "layerwise", every=cfg["every"],
                                         error_metric=cfg.get("metric", "absolute"),
                                         min_numel=cfg["min_numel"])


def run_method(name: str, cfg: dict, train, valid, hvd) -> dict:
    import torch
    import torch.nn.functional as F

    import qoda_hvd

    torch.manual_seed(cfg["seed"])  # the same initial weights for every method and rank
    m = cfg["model"]
    model = build_model(m["d"], m["heads"], m["layers"], m["d_ff"], m["seq"])
    base = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    opt = qoda_hvd.DistributedOptimizer(base, model.named_parameters(),
                                        compression=make_compression(name, model, cfg))
    data = torch.Generator().manual_seed(cfg["seed"] * 1000 + hvd.rank())  # the same batches per method
    comm = opt._communicator
    sent0 = comm.stats.bytes_sent
    losses = []
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        x, y = windows(train, cfg["batch"], m["seq"], data)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    sent = comm.stats.bytes_sent - sent0
    # Validation: the same windows for every method; each rank half of them, averaged.
    gen = torch.Generator().manual_seed(12345 + hvd.rank())
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg["eval_batches"]):
            x, y = windows(valid, cfg["batch"], m["seq"], gen)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    val = hvd.allreduce(torch.tensor([total / cfg["eval_batches"]], dtype=torch.float64),
                        op=hvd.Average, name=f"quality.val.{name}").item()
    ex = opt._exchange
    stats = opt.compression_stats()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name=f"quality.same.{name}")
    return {"method": name, "val_loss": val, "val_ppl": math.exp(val),
            "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
            "bytes_sent_per_step": sent / cfg["steps"], "seconds": seconds,
            "exchanges": stats["exchanges"], "collectives": comm.stats.collectives,
            "ranks": dict(getattr(ex, "ranks", {}) or {}),
            "rank_updates": getattr(ex, "rank_updates", None),
            "identical_across_ranks": all(torch.equal(everyone[0], e) for e in everyone),
            "params": flat.numel()}


def worker(cfg_path: str, out_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    import horovod.torch as hvd

    hvd.init()
    cfg = json.loads(Path(cfg_path).read_text())
    train, valid, desc = load_corpus(cfg["max_train_bytes"], cfg["max_valid_bytes"])
    results = []
    for name in cfg["methods"]:
        r = run_method(name, cfg, train, valid, hvd)
        results.append(r)
        if hvd.rank() == 0:
            print(f"  {name:<14} val loss {r['val_loss']:.4f}  {r['bytes_sent_per_step'] / 1e3:9.1f} "
                  f"kB/step  {r['seconds']:6.1f} s  ranks {r['ranks']}", flush=True)
    if hvd.rank() == 0:
        Path(out_path).write_text(json.dumps({"corpus": desc, "ranks": hvd.size(),
                                              "results": results}, indent=1))
    hvd.shutdown()
    return 0


# ---------------------------------------------------------------------------------- report
def report(data: dict) -> str:
    res = {r["method"]: r for r in data["results"]}
    fp32 = res["fp32"]["bytes_sent_per_step"]
    lines = [f"corpus: {data['corpus']}",
             f"model: {data['config']['model']}, {res['fp32']['params']:,} parameters; "
             f"{data['config']['steps']} steps of Adam (lr {data['config']['lr']}), batch "
             f"{data['config']['batch']} per rank, {data['ranks']} ranks; layer-wise DP error "
             f"metric: {data['config'].get('metric', 'absolute')}",
             f"{'method':<14} {'val loss':>8} {'val ppl':>8} {'kB/step':>9} {'ratio':>7} "
             f"{'s':>6}  ranks"]
    for name, r in res.items():
        ratio = fp32 / r["bytes_sent_per_step"]
        r["ratio"] = ratio
        lines.append(f"{name:<14} {r['val_loss']:>8.4f} {r['val_ppl']:>8.3f} "
                     f"{r['bytes_sent_per_step'] / 1e3:>9.1f} {ratio:>6.1f}x {r['seconds']:>6.1f}  "
                     f"{r['ranks'] or ''}")
    lines.append("")
    lines.append("layer-wise vs global PowerSGD (the paper's table analog; goal >= 1.4x at equal "
                 "or better loss, reported, not asserted)")
    globals_ = [r for n, r in res.items() if n.startswith("global_r")]
    for name, lw in res.items():
        if not name.startswith("layerwise_r"):
            continue
        g = res.get("global_" + name.split("_", 1)[1])
        if g is None:
            continue
        same_r = lw["ratio"] / g["ratio"]
        verdict = "equal or better" if lw["val_loss"] <= g["val_loss"] else "WORSE"
        no_better = [x for x in globals_ if x["val_loss"] >= lw["val_loss"]]
        best = max(no_better, key=lambda x: x["ratio"]) if no_better else None
        at_loss = (f"{lw['ratio'] / best['ratio']:.2f}x vs {best['method']} (loss "
                   f"{best['val_loss']:.4f})" if best else "no global run has loss >= it")
        lines.append(f"  R={name.split('_r')[1]:>2}: ratio {lw['ratio']:.1f}x vs {g['ratio']:.1f}x = "
                     f"{same_r:.2f}x, loss {lw['val_loss']:.4f} vs {g['val_loss']:.4f} ({verdict}); "
                     f"vs the most compressed global run with loss >= it: {at_loss}")
    return "\n".join(lines)


MODES = {
    "default": dict(steps=300, batch=8, lr=2e-3, eval_batches=32, every=100, seed=0,
                    min_numel=1024, max_train_bytes=8_000_000, max_valid_bytes=1_000_000,
                    model=dict(d=96, heads=4, layers=2, d_ff=384, seq=64)),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps per method (default 300)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                        help="PowerSGD ranks R, each run global and layer-wise (default 2 4)")
    parser.add_argument("--every", type=int, help="layer-wise: re-run the DP every N steps (100)")
    parser.add_argument("--metric", choices=("absolute", "relative"), default="absolute",
                        help="error_metric of the layer-wise runs' DP (default absolute, "
                             "L-GreCo's)")
    parser.add_argument("--np", type=int, default=2, help="ranks of the job (default 2)")
    parser.add_argument("--methods", nargs="+", metavar="NAME",
                        help="run only these (fp32, quant4, global_rR, layerwise_rR); fp32 is "
                             "always run, as the reference of the ratios")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole job")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_lm.json")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    cfg = dict(MODES["default"])
    if args.steps is not None:
        if args.steps < 50:
            parser.error(f"--steps must be >= 50, got {args.steps}")
        cfg["steps"] = args.steps
    if args.every is not None:
        if args.every < 0:
            parser.error(f"--every must be >= 0, got {args.every}")
        cfg["every"] = args.every
    cfg["metric"] = args.metric
    if any(r < 1 for r in args.ranks):
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.np < 2:
        parser.error(f"--np must be >= 2, got {args.np}")
    cfg["methods"] = (["fp32", "quant4"] + [f"global_r{r}" for r in args.ranks]
                      + [f"layerwise_r{r}" for r in args.ranks])
    if args.methods:
        known = set(cfg["methods"])
        bad = [m for m in args.methods if m not in known and not
               (m.split("_r")[0] in ("global", "layerwise") and m.split("_r")[-1].isdigit())]
        if bad:
            parser.error(f"--methods: unknown {bad}; choose from fp32, quant4, global_rR, "
                         "layerwise_rR")
        cfg["methods"] = ["fp32"] + [m for m in args.methods if m != "fp32"]
    import tempfile

    from qoda_hvd.launcher import run_local

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qoda-quality-") as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        proc = run_local(args.np, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                   str(cfg_path), str(out_path)], "mpirun",
                         timeout=args.timeout, stdout=None, stderr=subprocess.PIPE, text=True,
                         cwd=str(ROOT),
                         env=dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1"))
        if proc.returncode != 0 or not out_path.exists():
            sys.stderr.write((proc.stderr or "")[-4000:])
            print(f"the job failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        data = json.loads(out_path.read_text())
    data["config"] = cfg
    data["wall_seconds"] = time.perf_counter() - t0
    text = report(data)
    args.out.write_text(json.dumps(data, indent=1))
    print("\n" + text)
    print(f"wrote {args.out} ({data['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
