"""Quality benchmark: a byte-level LM on the Python standard library's own source, 2 ranks.

The text ships with every Python install: the ``.py`` files under ``sysconfig``'s ``stdlib``
directory (``site-packages`` excluded), split by FILE into training and validation (a file is
held out when ``crc32(relative path) % 10 == 0``, about 10% of the files), read as bytes
(vocabulary 256). A small pre-norm transformer LM is trained for a fixed number of steps on 2
ranks (real Horovod under ``mpirun``), every method from the same initial weights on the same
batches per seed, with Adam through ``qoda_hvd.DistributedOptimizer``:

- ``fp32``: ``Compression.none`` (one fused float32 allreduce);
- ``quant4``: ``Compression.layerwise(bits=4)``, layer-wise quantization (types from the model);
- ``global_rR``: ``Compression.powersgd(rank=R)``, one rank everywhere;
- ``layerwise_rR``: ``Compression.powersgd(rank=R, layerwise=True)``: per layer type, ranks by
  L-GreCo's DP under the error budget of rank R everywhere (re-run every ``--every`` steps),
  errors of the decision step's input, summed squared (absolute) errors: the defaults;
- ``layerwise+V[+V...]_rR``: the same with L-GreCo recipe variants ``V``: ``acc`` (errors of the
  inputs accumulated over the period between decisions, ``error_window="accumulated"``),
  ``layer`` (one rank per parameter, ``granularity="layer"``), ``rel`` (each unit's error over
  its input's squared norm, ``error_metric="relative"``).

Each point runs with every seed of ``--seeds`` (the seed sets the initial weights, the batches
and PowerSGD's Q). Reported per method: validation loss (nats/byte) mean +- standard error over
seeds, bytes this rank sent per step (logical, counted by the communicator), the compression
ratio against fp32's bytes, the per-unit ranks. Then the paper's table analog (QODA
Transformer-XL: layer-wise 1.47-1.52x the global compression ratio at equal perplexity): for
each layer-wise point, the global compression ratio AT ITS LOSS, interpolated on the global
Pareto curve (loss against log ratio, piecewise linear through the global ranks' mean losses),
and the gain = layer-wise ratio / that ratio; its uncertainty by a paired bootstrap over seeds
(seed sets drawn with replacement, the same draw for every method). ``quality_lm.png``: the
Pareto curves (loss vs ratio, error bars = 1 standard error).

Results are appended run by run (a cut-short sweep keeps what finished); ``--merge A.json B.json``
reports several sweeps' runs together (e.g. the variants run as a second job).

Usage::

    nice -n 15 .venv/bin/python bench/quality_lm.py             # 3 seeds x 8 points
    nice -n 15 .venv/bin/python bench/quality_lm.py --variants acc layer rel acc+layer \
        --no-base --out bench/results/quality_lm_variants.json
    .venv/bin/python bench/quality_lm.py --merge bench/results/quality_lm.json \
        bench/results/quality_lm_variants.json
    .venv/bin/python bench/quality_lm.py --quick                # smoke test, < 60 s

Writes ``bench/results/quality_lm.json`` (and ``.png``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
RESULTS = HERE / "results"


# ------------------------------------------------------------------------------------ data
# The standard library's sources, split by file: shared with examples/transformer_lm.py.
from data import load_stdlib_bytes as load_corpus  # noqa: E402


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
#: Recipe variants of the layer-wise runs: name -> (keyword of Compression.powersgd or the
#: exchange's error_window, value).
VARIANTS = {"acc": ("error_window", "accumulated"), "layer": ("granularity", "layer"),
            "rel": ("error_metric", "relative")}


def parse_method(name: str) -> tuple[str, tuple[str, ...], Optional[int]]:
    """``(kind, variants, rank)`` of a method name; kind fp32 / quant4 / global / layerwise."""
    if name in ("fp32", "quant4"):
        return name, (), None
    head, sep, rank = name.rpartition("_r")
    kind, *variants = head.split("+")
    if (not sep or not rank.isdigit() or int(rank) < 1 or kind not in ("global", "layerwise")
            or any(v not in VARIANTS for v in variants) or (variants and kind == "global")
            or len(set(variants)) != len(variants)):
        raise ValueError(f"unknown method {name!r}: fp32, quant4, global_rR, layerwise_rR or "
                         f"layerwise+V[+V]_rR with V in {', '.join(VARIANTS)}")
    return kind, tuple(variants), int(rank)


def make_compression(name: str, model, cfg: dict, seed: int):
    import qoda_hvd

    kind, variants, rank = parse_method(name)
    if kind == "fp32":
        return qoda_hvd.Compression.none
    if kind == "quant4":
        return qoda_hvd.Compression.layerwise(bits=4, types=model, min_numel=cfg["min_numel"],
                                              seed=seed)
    options = dict(error_metric=cfg.get("metric", "absolute"))
    window = "step"
    for v in variants:
        key, value = VARIANTS[v]
        if key == "error_window":
            window = value
        else:
            options[key] = value
    comp = qoda_hvd.Compression.powersgd(rank=rank, types=model, layerwise=kind == "layerwise",
                                         every=cfg["every"], min_numel=cfg["min_numel"],
                                         seed=seed, **options)
    if window == "step":
        return comp
    return _windowed_class()(comp.config, window)


def _windowed_class():
    from qoda_hvd.compression import LowRankCompressor

    class Windowed(LowRankCompressor):
        """``Compression.powersgd`` whose exchange measures the DP's errors on a window (the
        config has no field for it yet: the exchange takes it as an argument)."""

        def __init__(self, config, window: str) -> None:
            super().__init__(config)
            self.window = window

        def make_exchange(self, named_parameters, communicator, average: bool = True):
            from qoda_hvd.comm.lowrank import make_powersgd_exchange

            return make_powersgd_exchange(self.config, named_parameters, communicator, average,
                                          error_window=self.window)

    return Windowed


def run_method(name: str, seed: int, cfg: dict, train, valid, hvd) -> dict:
    import torch
    import torch.nn.functional as F

    import qoda_hvd

    torch.manual_seed(seed)  # the same initial weights for every method and rank
    m = cfg["model"]
    model = build_model(m["d"], m["heads"], m["layers"], m["d_ff"], m["seq"])
    base = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    opt = qoda_hvd.DistributedOptimizer(base, model.named_parameters(),
                                        compression=make_compression(name, model, cfg, seed))
    data = torch.Generator().manual_seed(seed * 1000 + hvd.rank())  # the same batches per method
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
    stats = opt.compression_stats()
    # Validation: the same windows for every method and seed; each rank half of them, averaged.
    gen = torch.Generator().manual_seed(12345 + hvd.rank())
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg["eval_batches"]):
            x, y = windows(valid, cfg["batch"], m["seq"], gen)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    val = hvd.allreduce(torch.tensor([total / cfg["eval_batches"]], dtype=torch.float64),
                        op=hvd.Average, name=f"quality.val.{name}.{seed}").item()
    ex = opt._exchange
    ex = getattr(ex, "inner", None) or ex
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name=f"quality.same.{name}.{seed}")
    tail = max(1, min(50, len(losses)))
    return {"method": name, "seed": seed, "val_loss": val, "val_ppl": math.exp(val),
            "train_loss_tail": sum(losses[-tail:]) / tail,
            "bytes_sent_per_step": stats["bytes_sent"] / cfg["steps"], "seconds": seconds,
            "exchanges": stats["exchanges"], "collectives": stats["collectives"],
            "ranks": dict(getattr(ex, "ranks", {}) or {}),
            "rank_updates": getattr(ex, "rank_updates", None),
            "error_window": getattr(ex, "error_window", None),
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
    for seed in cfg["seeds"]:
        for name in cfg["methods"]:
            r = run_method(name, seed, cfg, train, valid, hvd)
            results.append(r)
            if hvd.rank() == 0:
                print(f"  seed {seed} {name:<24} val loss {r['val_loss']:.4f}  "
                      f"{r['bytes_sent_per_step'] / 1e3:8.1f} kB/step  {r['seconds']:6.1f} s  "
                      f"ranks {r['ranks']}", flush=True)
                # Run by run, so a sweep cut short keeps what finished.
                Path(out_path).write_text(json.dumps({"corpus": desc, "ranks": hvd.size(),
                                                      "config": cfg, "results": results},
                                                     indent=1))
    hvd.shutdown()
    return 0


# ---------------------------------------------------------------------------------- report
def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def global_ratio_at(loss: float, curve: list[tuple[float, float]]) -> tuple[Optional[float], str]:
    """The global compression ratio at ``loss``: piecewise-linear interpolation of loss against
    log(ratio) through ``curve`` = [(ratio, loss)] sorted by ratio. Outside the curve's loss
    range: ``(None, "below"|"above")`` (a lower loss than every global point, or a higher one).
    Between non-monotone points the most compressed crossing counts (the best global ratio
    with a loss no better than ``loss``)."""
    pts = sorted(curve)
    best = None
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        lo, hi = min(l0, l1), max(l0, l1)
        if lo <= loss <= hi:
            t = 0.0 if l1 == l0 else (loss - l0) / (l1 - l0)
            ratio = math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
            best = ratio if best is None else max(best, ratio)
    if best is not None:
        return best, "inside"
    return None, "below" if loss < min(l for _, l in pts) else "above"


def aggregate(results: list[dict], seeds: list[int]) -> dict:
    """Per method: mean and standard error over ``seeds`` of loss and bytes, and the ratio."""
    fp32 = [r["bytes_sent_per_step"] for r in results if r["method"] == "fp32"]
    # Without an fp32 run (--no-fp32): what it sends at K = 2, the whole float32 gradient.
    fp32_bytes = sum(fp32) / len(fp32) if fp32 else 4.0 * results[0]["params"]
    out = {}
    for r in results:
        if r["seed"] not in seeds:
            continue
        out.setdefault(r["method"], []).append(r)
    summary = {}
    for name, runs in out.items():
        loss = mean_se([r["val_loss"] for r in runs])
        sent = mean_se([r["bytes_sent_per_step"] for r in runs])
        ratios = [fp32_bytes / r["bytes_sent_per_step"] for r in runs]
        summary[name] = {"val_loss": loss, "bytes_sent_per_step": sent,
                         "ratio": mean_se(ratios), "seeds": sorted(r["seed"] for r in runs),
                         "ranks": [r["ranks"] for r in runs],
                         "identical_across_ranks": all(r["identical_across_ranks"] for r in runs)}
    return summary


def equal_loss_gains(results: list[dict], seeds: list[int], draws: int = 2000) -> dict:
    """For each layer-wise method: its ratio over the interpolated global ratio at its mean
    loss, on the seeds that it and every global point have (paired), with a paired bootstrap
    over those seeds (16th / 50th / 84th percentiles; the share of draws at >= 1.3x counts
    draws without an interpolation as below)."""
    import random

    have: dict[str, set] = {}
    for r in results:
        if r["seed"] in seeds:
            have.setdefault(r["method"], set()).add(r["seed"])
    globals_ = [k for k in have if parse_method(k)[0] == "global"]
    out = {}
    for k in sorted(have):
        if parse_method(k)[0] != "layerwise" or len(globals_) < 2:
            continue
        paired = sorted(set.intersection(have[k], *(have[g] for g in globals_)))
        if not paired:
            continue
        runs = [r for r in results if r["method"] in globals_ + [k, "fp32"]]
        g, where = _gain_of(runs, k, paired)
        rng = random.Random(0)
        samples = []
        for _ in range(draws if len(paired) > 1 else 0):
            draw = [rng.choice(paired) for _ in paired]
            # The same seeds for every method (paired); a seed drawn twice counts twice.
            weighted = [dict(r, seed=i) for i, sd in enumerate(draw) for r in runs
                        if r["seed"] == sd]
            samples.append(_gain_of(weighted, k, list(range(len(draw))))[0])
        vals = sorted(x for x in samples if x is not None)
        boot = None
        if vals:
            q = lambda f: vals[min(len(vals) - 1, int(f * len(vals)))]  # noqa: E731
            boot = {"p16": q(0.16), "p50": q(0.5), "p84": q(0.84),
                    "defined": len(vals) / len(samples),
                    "share_ge_1_3": sum(x >= 1.3 for x in vals) / len(samples)}
        out[k] = {"gain": g, "where": where, "seeds": paired, "bootstrap": boot}
    return out


def _gain_of(results, method: str, seeds) -> tuple[Optional[float], str]:
    s = aggregate(results, seeds)
    curve = [(v["ratio"][0], v["val_loss"][0]) for k, v in s.items()
             if parse_method(k)[0] == "global"]
    g, where = global_ratio_at(s[method]["val_loss"][0], curve)
    return (s[method]["ratio"][0] / g if g else None), where


def report(data: dict) -> str:
    cfg = data["config"]
    seeds = sorted({r["seed"] for r in data["results"]})
    summary = aggregate(data["results"], seeds)
    data["summary"] = summary
    params = data["results"][0]["params"]
    lines = [f"corpus: {data['corpus']}",
             f"model: {cfg['model']}, {params:,} parameters; {cfg['steps']} steps of Adam (lr "
             f"{cfg['lr']}), batch {cfg['batch']} per rank, {data['ranks']} ranks; seeds {seeds}; "
             f"layer-wise DP every {cfg['every']} steps; mean +- standard error over seeds",
             f"{'method':<24} {'val loss':>17} {'kB/step':>9} {'ratio':>13} {'n':>2}  ranks (seed "
             f"{seeds[0]})"]
    order = sorted(summary, key=lambda k: (parse_method(k)[0] != "fp32", parse_method(k)[0] != "quant4",
                                           parse_method(k)[0], parse_method(k)[1],
                                           -(parse_method(k)[2] or 0)))
    for name in order:
        s = summary[name]
        (l, le), (b, _), (c, ce) = s["val_loss"], s["bytes_sent_per_step"], s["ratio"]
        lines.append(f"{name:<24} {l:>8.4f} +- {le:.4f} {b / 1e3:>9.1f} {c:>6.1f}x +- {ce:<4.1f} "
                     f"{len(s['seeds']):>2}  {s['ranks'][0] or ''}")
    gains = equal_loss_gains(data["results"], seeds)
    data["equal_loss_gains"] = gains
    lines.append("")
    lines.append("layer-wise vs global PowerSGD at equal validation loss (the paper: 1.47-1.52x; "
                 "goal >= 1.3x; reported, not asserted): layer-wise ratio / global ratio "
                 "interpolated at the layer-wise mean loss; [16%, 84%] of a paired bootstrap "
                 "over seeds")
    for name in order:
        if name not in gains:
            continue
        g = gains[name]
        if g["gain"] is None:
            lines.append(f"  {name:<24} loss {summary[name]['val_loss'][0]:.4f} is {g['where']} "
                         f"every global point: no interpolation")
            continue
        b = g["bootstrap"]
        band = (f"[{b['p16']:.2f}, {b['p84']:.2f}], >= 1.3x in {100 * b['share_ge_1_3']:.0f}% of "
                f"draws" if b else "(one seed: no band)")
        lines.append(f"  {name:<24} {g['gain']:.2f}x {band}  (seeds {g['seeds']})")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return False
    summary = data["summary"]
    families: dict[str, list] = {}
    for name, s in summary.items():
        kind, variants, rank = parse_method(name)
        label = {"fp32": "fp32", "quant4": "layer-wise quantization 4-bit", "global": "PowerSGD global",
                 "layerwise": "PowerSGD layer-wise"}[kind] + (f" +{'+'.join(variants)}" if variants else "")
        families.setdefault(label, []).append((s["ratio"], s["val_loss"], rank))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label in [k for k in families if k == "fp32"]:  # the reference: a line, not a point
        (_, (loss, se), _), = families.pop(label)
        ax.axhline(loss, color="grey", ls="--", lw=1, label=f"fp32 ({loss:.3f} +- {se:.3f})")
    for label, pts in sorted(families.items()):
        pts.sort(key=lambda p: p[0][0])
        xs, xe = [p[0][0] for p in pts], [p[0][1] for p in pts]
        ys, ye = [p[1][0] for p in pts], [p[1][1] for p in pts]
        style = dict(marker="o", ms=4, capsize=3, lw=1.2)
        if label.startswith("PowerSGD global"):
            style.update(lw=2.2, color="black")
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, label=label, **style)
        for (x, _, _), (y, _, _), r in zip([p[0] + (0,) for p in pts], [p[1] + (0,) for p in pts],
                                           [p[2] for p in pts]):
            if r is not None:
                ax.annotate(f"R{r}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio vs fp32 (bytes per step, logical)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    counts = sorted({len(s["seeds"]) for s in summary.values()})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    ax.set_title(f"byte-level LM, 2 ranks, {data['config']['steps']} steps; each point the mean "
                 f"of {n} seeds, bars +-1 s.e.", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


MODES = {
    "default": dict(steps=500, batch=8, lr=2e-3, eval_batches=32, every=100, seeds=[0, 1, 2],
                    min_numel=1024, max_train_bytes=8_000_000, max_valid_bytes=1_000_000,
                    model=dict(d=96, heads=4, layers=2, d_ff=384, seq=64)),
    "quick": dict(steps=20, batch=4, lr=2e-3, eval_batches=4, every=10, seeds=[0],
                  min_numel=256, max_train_bytes=400_000, max_valid_bytes=100_000,
                  model=dict(d=32, heads=2, layers=1, d_ff=64, seq=32)),
}


def finish(data: dict, out: Path) -> int:
    text = report(data)
    out.write_text(json.dumps(data, indent=1))
    plotted = plot(data, out.with_suffix(".png"))
    print("\n" + text)
    print(f"wrote {out}{' and ' + str(out.with_suffix('.png')) if plotted else ''}"
          + (f" ({data['wall_seconds']:.0f} s)" if "wall_seconds" in data else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a tiny LM, 20 steps, one seed (< 60 s)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 500)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds per point (default 0 1 2)")
    parser.add_argument("--global-ranks", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="PowerSGD ranks R of the global curve (default 1 2 4 8)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8],
                        help="ranks R of the layer-wise runs (default 2 4 8)")
    parser.add_argument("--variants", nargs="+", default=[], metavar="V[+V]",
                        help=f"layer-wise recipe variants to run too, each at every --ranks R: "
                             f"{', '.join(VARIANTS)} or combinations such as acc+layer")
    parser.add_argument("--no-base", action="store_true",
                        help="run only fp32 and the --variants (not the global and plain "
                             "layer-wise curves)")
    parser.add_argument("--quant4", action="store_true", help="run layer-wise 4-bit quantization too")
    parser.add_argument("--every", type=int, help="layer-wise: re-run the DP every N steps (100)")
    parser.add_argument("--metric", choices=("absolute", "relative"), default="absolute",
                        help="error_metric of the plain layer-wise runs' DP (default absolute, "
                             "L-GreCo's)")
    parser.add_argument("--np", type=int, default=2, help="ranks of the job (default 2)")
    parser.add_argument("--methods", nargs="+", metavar="NAME",
                        help="run exactly these (fp32, quant4, global_rR, layerwise[+V]_rR); fp32 "
                             "is always run, as the reference of the ratios")
    parser.add_argument("--no-fp32", action="store_true",
                        help="with --methods: do not run fp32 (a job merged later with one that "
                             "did; ratios alone use 4 bytes x parameters, fp32 at 2 ranks)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="no run: report the runs of these result files together")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds for the whole job")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/quality_lm.json; --quick: "
                             "quality_lm_quick.json); the plot goes next to it")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    out = args.out or RESULTS / ("quality_lm_quick.json" if args.quick else "quality_lm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        data = dict(parts[0])
        seen, data["results"] = set(), []
        for p in parts:  # a (method, seed) run in several files (fp32 in each) counts once
            for r in p["results"]:
                if (r["method"], r["seed"]) not in seen:
                    seen.add((r["method"], r["seed"]))
                    data["results"].append(r)
        data["merged_from"] = [str(p) for p in args.merge]
        for p in parts[1:]:
            mismatch = {k for k in ("steps", "batch", "lr", "every", "model")
                        if p["config"].get(k) != data["config"].get(k)}
            if mismatch:
                parser.error(f"--merge: the files differ in {sorted(mismatch)}")
        return finish(data, out)
    cfg = dict(MODES["quick" if args.quick else "default"])
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        cfg["steps"] = args.steps
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.every is not None:
        if args.every < 0:
            parser.error(f"--every must be >= 0, got {args.every}")
        cfg["every"] = args.every
    cfg["metric"] = args.metric
    if any(r < 1 for r in args.ranks + args.global_ranks):
        parser.error(f"--ranks / --global-ranks must be >= 1, got {args.ranks} {args.global_ranks}")
    if args.np < 2:
        parser.error(f"--np must be >= 2, got {args.np}")
    methods = ["fp32"] + (["quant4"] if args.quant4 else [])
    if not args.no_base:
        methods += [f"global_r{r}" for r in args.global_ranks]
        methods += [f"layerwise_r{r}" for r in args.ranks]
    methods += [f"layerwise+{v}_r{r}" for v in args.variants for r in args.ranks]
    if args.methods:
        methods = ([] if args.no_fp32 else ["fp32"]) + [m for m in args.methods if m != "fp32"]
    for m in methods:
        try:
            parse_method(m)
        except ValueError as e:
            parser.error(f"--methods / --variants: {e}")
    cfg["methods"] = methods

    from qoda_hvd.launcher import run_local

    import tempfile

    with tempfile.TemporaryDirectory(prefix="qoda-quality-") as tmp:
        cfg_path = Path(tmp) / "cfg.json"
        partial = out.with_suffix(".partial.json")
        cfg_path.write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        proc = run_local(args.np, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                   str(cfg_path), str(partial)], "mpirun",
                         timeout=args.timeout, stdout=None, stderr=subprocess.PIPE, text=True,
                         cwd=str(ROOT),
                         env=dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1"))
        if proc.returncode != 0 or not partial.exists():
            sys.stderr.write((proc.stderr or "")[-4000:])
            print(f"the job failed (exit {proc.returncode}); runs that finished are in "
                  f"{partial}", file=sys.stderr)
            return 1
        data = json.loads(partial.read_text())
        partial.unlink()
    data["config"] = cfg
    data["wall_seconds"] = time.perf_counter() - t0
    return finish(data, out)


if __name__ == "__main__":
    raise SystemExit(main())
