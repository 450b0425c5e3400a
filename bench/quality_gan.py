"""Quality benchmark: WGAN-GP on real handwritten digits, 2 ranks, layer-wise vs global quantization.

The paper's first experiment (WGAN-GP on CIFAR-10, layer-wise vs global quantization, FID) on
data that ships offline: scikit-learn's 1,797 8x8 digits (``examples/digits.py``: 1,397
training images, 400 held out). A small conv generator and critic play ONE joint game (the
stacked field ``(grad_G L_G, grad_D L_D)``, gradient penalty 10, as ``examples/wgan_gp.py``),
on 2 real ranks under ``mpirun``, every method from the same initial weights, on the same
batches and for the same number of iterations, per seed:

- ``fp32``: QODA, ``Compression.none`` (Horovod's float32 allreduce);
- ``qoda_lw4``: QODA + ``Compression.layerwise(bits=4)``: optimal levels per layer type
  (types from the modules: convolution, feed-forward; biases and small tensors raw);
- ``qoda_global4``: QODA + 4 bits with ONE level table for every compressed tensor (the paper's
  "global" baseline: every layer that layer-wise would quantize mapped to one type);
- ``qoda_lw3``: QODA + layer-wise 3 bits;
- ``qgenx_global4``: extra-gradient (Q-GenX, adaptive steps) with global 4-bit quantization:
  TWO exchanges per iteration;
- ``oadam_lw4``: optimistic Adam + layer-wise 4 bits.

Quality: an FID *analogue* (not Inception-FID): the Frechet distance between the 64
penultimate features of a small digits classifier (trained once, deterministically, cached;
its test accuracy is printed) on ``--n-fake`` generated images (fixed latents per seed, at the
base iterates) and on ``--n-real`` held-out real images, plus the classifier's label entropy
(ln 10 = 2.303 at best) and the share of the 10 digits covered. The floor of the FID analogue
(real training images vs the held-out ones, same sample sizes) is printed beside it.

Reported per method: final FID mean +- standard error over seeds, label entropy, coverage,
bytes this rank sent per iteration (logical), bits per coordinate, exchanges per iteration.
Writes ``bench/results/quality_gan.json``, ``quality_gan.png`` (FID vs iteration and vs MB
sent, mean over seeds with a +-1 standard error band) and ``quality_gan_grid_<method>.png``
(generated digits of seed 0).

Usage::

    nice -n 15 .venv/bin/python bench/quality_gan.py            # the full sweep
    .venv/bin/python bench/quality_gan.py --quick               # smoke test, < 60 s
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
RESULTS = HERE / "results"

#: method -> (optimizer, compression, label)
METHODS = {
    "fp32": ("qoda", "none", "QODA, fp32 allreduce"),
    "qoda_lw4": ("qoda", "layerwise4", "QODA + layer-wise 4-bit"),
    "qoda_global4": ("qoda", "global4", "QODA + global 4-bit"),
    "qoda_lw3": ("qoda", "layerwise3", "QODA + layer-wise 3-bit"),
    "qgenx_global4": ("extragradient", "global4", "Q-GenX: extra-gradient + global 4-bit"),
    "oadam_lw4": ("optimistic-adam", "layerwise4", "optimistic Adam + layer-wise 4-bit"),
}

#: Final quality of a run: the mean of its last TAIL evaluations.
TAIL = 3

MODES = {
    "default": dict(steps=1000, eval_every=100, seeds=[0, 1, 2], batch=32, latent=32, width=16,
                    n_fake=400, n_real=400, lr_adam=(1e-3, 1e-3), betas=(0.5, 0.9), gp=10.0,
                    coding="rans"),
    "quick": dict(steps=20, eval_every=10, seeds=[0], batch=16, latent=16, width=8,
                  n_fake=100, n_real=100, lr_adam=(1e-3, 1e-3), betas=(0.5, 0.9), gp=10.0,
                  coding="rans"),
}


# ----------------------------------------------------------------------------------- model
def build_model(latent: int, width: int):
    """Generator (latent -> 2x2 -> 4x4 -> 8x8, BatchNorm) and critic (8x8 -> 4x4 -> 2x2 ->
    linear, no normalisation: the gradient penalty needs none), named ``G.*`` and ``D.*``."""
    import torch
    from torch import nn

    w = width

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(latent, 4 * w * 2 * 2)
            self.body = nn.Sequential(
                nn.BatchNorm2d(4 * w), nn.ReLU(), nn.Upsample(scale_factor=2),
                nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, 1, 3, padding=1), nn.Tanh())

        def forward(self, z):
            return self.body(self.fc(z).view(-1, 4 * w, 2, 2))

    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
            self.body = nn.Sequential(
                nn.Conv2d(1, w, 3, padding=1), act(),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), act(),
                nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), act())
            self.head = nn.Linear(4 * w * 2 * 2, 1)

        def forward(self, x):
            return self.head(self.body(x).flatten(1)).squeeze(1)

    class WGAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.latent = latent
            self.G = Generator()
            self.D = Critic()

    return WGAN()


def make_compression(kind: str, model, seed: int, coding: str):
    """``none``, ``layerwise<B>`` (types from the modules) or ``global<B>`` (one type)."""
    import qoda_hvd
    from qoda_hvd.quant import classify_parameters

    if kind == "none":
        return qoda_hvd.Compression.none
    bits = int(kind[-1])
    if kind.startswith("layerwise"):
        return qoda_hvd.Compression.layerwise(bits=bits, types=model, coding=coding, seed=seed)
    # Global: what layer-wise would send raw stays raw; everything else is ONE type, so one
    # level table (the paper's global quantization), the same bits and codec.
    typing = classify_parameters(model)
    overrides = [(name, "uncompressed") for name in sorted(typing.uncompressed)] + [("*", "global")]
    return qoda_hvd.Compression.layerwise(bits=bits, types=overrides, coding=coding, seed=seed)


def make_optimizer(name: str, model, cfg: dict):
    """QODA / extra-gradient with adaptive steps (lr from the Adam rate, ``adaptive_lr``), or
    optimistic Adam; one parameter group per player."""
    import torch

    import _common as common
    import qoda_hvd

    d_params, g_params = list(model.D.parameters()), list(model.G.parameters())
    lr_d, lr_g = cfg["lr_adam"]
    if name == "optimistic-adam":
        groups = [{"params": d_params, "lr": lr_d}, {"params": g_params, "lr": lr_g}]
        return qoda_hvd.optimistic(torch.optim.Adam(groups, betas=tuple(cfg["betas"])))
    groups = [{"params": d_params, "lr": common.adaptive_lr(lr_d, d_params)},
              {"params": g_params, "lr": common.adaptive_lr(lr_g, g_params)}]
    if name == "qoda":
        return qoda_hvd.QODA(groups, step_size="adaptive")
    return qoda_hvd.ExtraGradient(groups, step_size="adaptive")


# ---------------------------------------------------------------------------------- worker
def run_one(method: str, seed: int, cfg: dict, images, net, hvd) -> dict:
    import torch

    import _common as common
    import digits
    import qoda_hvd
    from wgan_gp import gradient_penalty

    opt_name, comp_kind, _ = METHODS[method]
    torch.manual_seed(seed)  # the same initial players on every rank and for every method
    model = build_model(cfg["latent"], cfg["width"])
    base = make_optimizer(opt_name, model, cfg)
    opt = qoda_hvd.DistributedOptimizer(base, model.named_parameters(),
                                        compression=make_compression(comp_kind, model, seed,
                                                                     cfg["coding"]))
    d_params, g_params = list(model.D.parameters()), list(model.G.parameters())
    fixed_z = torch.randn(cfg["n_fake"], cfg["latent"],
                          generator=torch.Generator().manual_seed(10_000 + seed))
    rank, batch = hvd.rank(), cfg["batch"]
    state = {"step": 0, "calls": 0}

    def field() -> dict:
        gen = common.step_generator(seed, rank, state["step"], stream=state["calls"])
        state["calls"] += 1
        real = images[torch.randint(images.shape[0], (batch,), generator=gen)]
        z = torch.randn(batch, cfg["latent"], generator=gen)
        fake = model.G(z)
        scores = model.D(torch.cat([real, fake]))
        d_real, d_fake = scores[:batch].mean(), scores[batch:].mean()
        penalty = gradient_penalty(model.D, real, fake, gen)
        loss_d = d_fake - d_real + cfg["gp"] * penalty
        loss_g = -d_fake
        loss_d.backward(inputs=d_params, retain_graph=True)
        loss_g.backward(inputs=g_params)
        return {"wasserstein": (d_real - d_fake).item()}

    curve = []
    t0 = time.perf_counter()
    eval_s = 0.0
    for step in range(1, cfg["steps"] + 1):
        state["step"], state["calls"] = step, 0
        out = common.run_iteration(opt, field)
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            te = time.perf_counter()
            stats = opt.compression_stats()
            point = {"step": step, "bytes_sent": stats["bytes_sent"],
                     "wasserstein": out["wasserstein"]}
            if rank == 0:  # every rank holds the same players; rank 0 scores them
                model.G.eval()
                with torch.no_grad(), common.at_base_iterates(opt):
                    fake = model.G(fixed_z)
                model.G.train()
                q = digits.digit_quality(fake, net, n_real=cfg["n_real"])
                point.update(fid=q["fid"], label_entropy=q["label_entropy"],
                             coverage=q["coverage"], confidence=q["confidence"])
                if step == cfg["steps"]:
                    point["class_shares"] = q["class_shares"]
                    final_images = fake[:100].clone()
            curve.append(point)
            eval_s += time.perf_counter() - te
    seconds = time.perf_counter() - t0 - eval_s
    stats = opt.compression_stats()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name=f"quality_gan.same.{method}.{seed}")
    result = {"method": method, "seed": seed, "curve": curve, "seconds": seconds,
              "exchanges": stats["exchanges"], "bits_per_coordinate": stats["bits_per_coordinate"],
              "bytes_sent_per_iteration": stats["bytes_sent"] / cfg["steps"],
              "exchanges_per_iteration": stats["exchanges"] / cfg["steps"],
              "types": {k: v for k, v in (stats.get("types") or {}).items()},
              "identical_across_ranks": all(torch.equal(everyone[0], e) for e in everyone),
              "params": flat.numel()}
    if rank == 0:
        result["final_images"] = final_images.tolist()
    return result


def worker(cfg_path: str, out_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    import horovod.torch as hvd

    import digits

    hvd.init()
    cfg = json.loads(Path(cfg_path).read_text())
    images, _ = digits.load_digits("train")
    net = digits.digit_classifier(cfg["cache_dir"]) if hvd.rank() == 0 else None
    results = []
    for seed in cfg["seeds"]:
        for method in cfg["methods"]:
            r = run_one(method, seed, cfg, images, net, hvd)
            results.append(r)
            if hvd.rank() == 0:
                # Run by run, so a sweep cut short keeps what finished (--report reads it).
                Path(out_path).write_text(json.dumps({"ranks": hvd.size(), "config": cfg,
                                                      "results": results}))
                last = r["curve"][-1]
                print(f"  seed {seed} {method:<14} FID {last['fid']:8.2f}  entropy "
                      f"{last['label_entropy']:.3f}  coverage {last['coverage']:.1f}  "
                      f"{r['bytes_sent_per_iteration'] / 1e3:8.1f} kB/it  "
                      f"{r['bits_per_coordinate']:5.2f} bits/coord  {r['seconds']:6.1f} s",
                      flush=True)
    hvd.shutdown()
    return 0


# ---------------------------------------------------------------------------------- report
def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarise(data: dict) -> dict:
    """Per method: final metrics' mean and standard error over seeds, curves aligned by step."""
    out = {}
    methods = data["config"]["methods"]
    # Paired comparisons: only seeds that every method finished (a sweep cut short).
    complete = [sd for sd in data["config"]["seeds"]
                if all(any(r["method"] == m and r["seed"] == sd for r in data["results"])
                       for m in methods)]
    data["complete_seeds"] = complete
    for method in methods:
        # Each method over every seed it finished (n in the table); the goals compare methods
        # on the seeds both finished (paired differences).
        runs = [r for r in data["results"] if r["method"] == method]
        if not runs:
            continue
        s = {"label": METHODS[method][2], "seeds": [r["seed"] for r in runs]}
        for key in ("fid", "label_entropy", "coverage", "confidence"):
            # Per run: the mean of the last TAIL evaluations (one point of a GAN's curve jumps
            # by tens of percent from one evaluation to the next); then over seeds.
            s[key] = mean_se([sum(p[key] for p in r["curve"][-TAIL:]) / len(r["curve"][-TAIL:])
                              for r in runs])
            s[key + "_last"] = mean_se([r["curve"][-1][key] for r in runs])
        for key in ("bytes_sent_per_iteration", "bits_per_coordinate", "exchanges_per_iteration",
                    "seconds"):
            s[key] = mean_se([r[key] for r in runs])
        steps = [p["step"] for p in runs[0]["curve"]]
        s["steps"] = steps
        s["fid_curve"] = [mean_se([r["curve"][i]["fid"] for r in runs]) for i in range(len(steps))]
        s["mb_curve"] = [sum(r["curve"][i]["bytes_sent"] for r in runs) / len(runs) / 1e6
                         for i in range(len(steps))]
        s["identical_across_ranks"] = all(r["identical_across_ranks"] for r in runs)
        s["fid_by_seed"] = {str(r["seed"]): sum(p["fid"] for p in r["curve"][-TAIL:])
                            / len(r["curve"][-TAIL:]) for r in runs}
        s["types"] = runs[0]["types"]
        out[method] = s
    return out


def report(data: dict, summary: dict) -> str:
    cfg = data["config"]
    lines = [f"data: scikit-learn digits, {cfg['n_train']} training images (8x8, [-1, 1]); "
             f"FID analogue on the 64 features of a digits classifier (test accuracy "
             f"{data['classifier_accuracy']:.4f}), {cfg['n_fake']} generated vs {cfg['n_real']} "
             f"held-out real images; floor (real training vs held-out, same sizes): "
             f"{data['fid_floor']:.2f}",
             f"game: WGAN-GP (gp {cfg['gp']}), G+D {data['results'][0]['params']:,} parameters, "
             f"{cfg['steps']} iterations, batch {cfg['batch']} per rank, {data['ranks']} ranks, "
             f"seeds done by every method {data['complete_seeds']} (n: the seeds each method "
             f"finished); coding {cfg['coding']}; final FID = mean of the last "
             f"{TAIL} evaluations (every {cfg['eval_every']} iterations) of each run, then mean "
             f"+- standard error over seeds; 'last' = the last evaluation only",
             f"{'method':<14} {'FID (mean +- se)':>18} {'last':>16} {'label H':>8} {'coverage':>9} "
             f"{'kB/it':>8} {'bits/coord':>10} {'exch/it':>7} {'s/run':>6} {'n':>2}  FID per seed"]
    for method, s in summary.items():
        fid, se = s["fid"]
        last, last_se = s["fid_last"]
        lines.append(f"{method:<14} {fid:>9.2f} +- {se:<6.2f} {last:>7.1f} +- {last_se:<5.1f} "
                     f"{s['label_entropy'][0]:>8.3f} "
                     f"{s['coverage'][0]:>9.2f} {s['bytes_sent_per_iteration'][0] / 1e3:>8.1f} "
                     f"{s['bits_per_coordinate'][0]:>10.2f} {s['exchanges_per_iteration'][0]:>7.0f} "
                     f"{s['seconds'][0]:>6.1f} {len(s['seeds']):>2}  "
                     + " ".join(f"{sd}:{f:.0f}" for sd, f in s["fid_by_seed"].items()))
    lines.append("")
    lines.append("goals (reported, not asserted): paired FID differences on the seeds both "
                 "methods finished, mean +- standard error of the per-seed differences")

    def diff(a: str, b: str):
        fa, fb = summary[a]["fid_by_seed"], summary[b]["fid_by_seed"]
        common = sorted(set(fa) & set(fb))
        if len(common) < 2:
            return None, None, common
        d, se = mean_se([fa[sd] - fb[sd] for sd in common])
        return d, se, common

    for a, b, what in (("qoda_lw4", "fp32", "layer-wise 4-bit vs fp32"),
                       ("qoda_lw4", "qoda_global4", "layer-wise 4-bit vs global 4-bit"),
                       ("qoda_lw3", "qoda_global4", "layer-wise 3-bit vs global 4-bit")):
        if not {a, b} <= set(summary):
            continue
        d, se, common = diff(a, b)
        if d is None:
            lines.append(f"  {what}: fewer than 2 common seeds ({common}): no verdict")
            continue
        within = abs(d) <= 2 * se
        lines.append(f"  {what}: FID difference {d:+.1f} +- {se:.1f} over seeds {common}; "
                     f"{'within' if within else 'NOT within'} 2 standard errors of 0; bits/coord "
                     f"{summary[a]['bits_per_coordinate'][0]:.2f} vs "
                     f"{summary[b]['bits_per_coordinate'][0]:.2f}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, s in summary.items():
        mean = [m for m, _ in s["fid_curve"]]
        lo = [m - e for m, e in s["fid_curve"]]
        hi = [m + e for m, e in s["fid_curve"]]
        for ax, x in ((axes[0], s["steps"]), (axes[1], s["mb_curve"])):
            (line,) = ax.plot(x, mean, label=s["label"], lw=1.5)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    for ax, xlabel in ((axes[0], "iteration"), (axes[1], "MB sent per rank")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID analogue (digits classifier features)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    counts = sorted({len(s["seeds"]) for s in summary.values()})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle(f"WGAN-GP on scikit-learn digits, 2 ranks: each line the mean over {n} seeds, "
                 f"band +-1 s.e.", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny players, 20 iterations, one seed (< 60 s)")
    parser.add_argument("--steps", type=int, help="iterations per run (default 1000)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="NAME",
                        help=f"run only these ({', '.join(METHODS)})")
    parser.add_argument("--eval-every", type=int, help="iterations between FID points (100)")
    parser.add_argument("--lr", type=float, nargs=2, metavar=("CRITIC", "GENERATOR"),
                        help="Adam-scale learning rates of the players (default 1e-3 1e-3); "
                             "QODA / extra-gradient take them times sqrt(#params of the player)")
    parser.add_argument("--np", type=int, default=2, help="ranks of the job (default 2)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the digits classifier is cached (default ~/.cache/qoda_hvd)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the whole job")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/quality_gan.json; --quick: "
                             "quality_gan_quick.json); plots and grids go next to it")
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                        help="no run: report the runs of (partial) results files together, "
                             "e.g. seeds run as separate jobs (a method and seed counts once)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if args.report:
        parts = [json.loads(p.read_text()) for p in args.report]
        data = dict(parts[0])
        data["config"] = dict(parts[0]["config"])
        seen, data["results"] = set(), []
        for p in parts:
            mismatch = {k for k in ("steps", "batch", "latent", "width", "lr_adam", "n_fake",
                                    "n_real", "eval_every") if p["config"].get(k) != data["config"].get(k)}
            if mismatch:
                parser.error(f"--report: the files differ in {sorted(mismatch)}")
            for r in p["results"]:
                if (r["method"], r["seed"]) not in seen:
                    seen.add((r["method"], r["seed"]))
                    data["results"].append(r)
        data["config"]["seeds"] = sorted({r["seed"] for r in data["results"]})
        data["config"]["methods"] = [m for m in METHODS
                                     if any(m in p["config"]["methods"] for p in parts)]
        if len(parts) > 1:
            data["merged_from"] = [str(p) for p in args.report]
        out = args.out or args.report[0].with_name(args.report[0].name.replace(".partial", ""))
        return finish(data, out)
    cfg = dict(MODES["quick" if args.quick else "default"])
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        cfg["steps"] = args.steps
    if args.eval_every is not None:
        if args.eval_every < 1:
            parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
        cfg["eval_every"] = args.eval_every
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.lr is not None:
        if min(args.lr) <= 0:
            parser.error(f"--lr must be positive, got {args.lr}")
        cfg["lr_adam"] = tuple(args.lr)
    if args.np < 1:
        parser.error(f"--np must be >= 1, got {args.np}")
    cfg["methods"] = args.methods or list(METHODS)
    out = args.out or RESULTS / ("quality_gan_quick.json" if args.quick else "quality_gan.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    import torch

    import _common as common
    import digits
    from qoda_hvd.launcher import run_local

    torch.set_num_threads(1)
    # Train (or load) the classifier here, once, before the ranks start.
    t_cls = time.perf_counter()
    net = digits.digit_classifier(args.cache_dir)
    train_images, _ = digits.load_digits("train")
    cfg["n_train"] = int(train_images.shape[0])
    cfg["cache_dir"] = args.cache_dir
    order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(1))
    floor = digits.digit_quality(train_images[order[:cfg["n_fake"]]], net, n_real=cfg["n_real"])
    print(f"digits classifier: test accuracy {net.accuracy:.4f} "
          f"({'cached' if net.from_cache else 'trained'}, {time.perf_counter() - t_cls:.1f} s); "
          f"FID floor (real vs held-out) {floor['fid']:.2f}", flush=True)
    cfg["classifier_accuracy"] = net.accuracy
    cfg["fid_floor"] = floor["fid"]
    partial = out.with_suffix(".partial.json")
    with tempfile.TemporaryDirectory(prefix="qoda-quality-gan-") as tmp:
        cfg_path = Path(tmp) / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        proc = run_local(args.np, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                   str(cfg_path), str(partial)], "mpirun",
                         timeout=args.timeout, stdout=None, stderr=subprocess.PIPE, text=True,
                         cwd=str(ROOT),
                         env=dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1"))
    if proc.returncode != 0 or not partial.exists():
        sys.stderr.write((proc.stderr or "")[-4000:])
        print(f"the job failed (exit {proc.returncode}); runs that finished are in {partial} "
              f"(--report {partial})", file=sys.stderr)
        return 1
    data = json.loads(partial.read_text())
    data["wall_seconds"] = time.perf_counter() - t0
    status = finish(data, out)
    partial.unlink()
    return status


def finish(data: dict, out: Path) -> int:
    """Summary, table, plot, grids and JSON of a sweep's runs."""
    import torch

    import _common as common
    import digits

    cfg = data["config"]
    data["classifier_accuracy"] = cfg["classifier_accuracy"]
    data["fid_floor"] = cfg["fid_floor"]
    summary = summarise(data)
    stem = out.with_suffix("")
    for method in summary:
        run = next(r for r in data["results"] if r["method"] == method)
        if "final_images" in run:  # a report of a finished file has no images left
            grid = digits.digit_grid(torch.tensor(run["final_images"]), columns=10, scale=3)
            common.write_png(f"{stem}_grid_{method}.png", grid)
    for r in data["results"]:
        r.pop("final_images", None)
    data["summary"] = summary
    text = report(data, summary)
    out.write_text(json.dumps(data, indent=1))
    plotted = plot(summary, stem.with_suffix(".png"))
    print("\n" + text)
    print(f"wrote {out}{', ' + str(stem.with_suffix('.png')) if plotted else ''} and "
          f"{stem.name}_grid_<method>.png"
          + (f" ({data['wall_seconds']:.0f} s)" if "wall_seconds" in data else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
