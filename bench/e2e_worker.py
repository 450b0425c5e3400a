"""Per-rank job of ``bench/e2e.py``: every method side by side in one Horovod job.

Started by ``bench/e2e.py`` under ``mpirun`` (one rank per emulated node, or local ranks for the
unshaped run) with ``--config`` (a JSON file of sizes and steps) and ``--out`` (where rank 0
writes the results). Not meant to be run by hand, but it can be::

    mpirun -np 2 .venv/bin/python bench/e2e_worker.py --config cfg.json --out out.json

What it measures, per model (a WGAN-GP at CIFAR size and a communication-heavy transformer LM):

- ``compute``: the same model and QODA update with no wrapper and no communication;
- ``hvd_fp32`` / ``hvd_fp16``: ``horovod.torch.DistributedOptimizer`` around QODA, with
  ``hvd.Compression.none`` / ``hvd.Compression.fp16`` (per-tensor allreduces launched from the
  gradient hooks, overlapping the backward pass, fused by Horovod);
- ``eg_global``: ``qoda_hvd.DistributedOptimizer(ExtraGradient)`` with ONE quantizer for every
  tensor (``types={"*": "feedforward"}``), two gradients and two exchanges per iteration;
- ``qoda_allgather`` / ``qoda_scatter_gather``: ``qoda_hvd.DistributedOptimizer(QODA)`` with
  layer-wise quantization (types from the model) and entropy coding, one exchange per iteration;
- ``qoda_overlap``: allgather with ``overlap=True`` (buckets started from the gradient hooks);
  ``qoda_overlap_mpi``: the same over ``MPICommunicator`` (mpi4py point to point, progressed from
  the hooks, no polling thread) instead of Horovod's collectives;
  ``qoda_probed``: allgather with the default ``overlap=None``, which times overlapped and
  one-block iterations over its first 14 eligible steps and keeps the faster (warms up 16
  iterations; its row says which it kept);
- ``qoda_fallback``: the same (``exchange="auto"``) with ``fallback=True``: exchanges 1-3 timed
  quantized and 5-7 as one float32 allreduce, then all ranks keep the faster (so it warms up 8
  iterations); its row says what it ended up sending.

Low-rank rows (kept apart under ``"lowrank"`` in the results, timed in the same interleaved
rounds as the rows above):

- ``psgd_global`` / ``psgd_layerwise``: ``qoda_hvd.DistributedOptimizer(QODA)`` with
  ``Compression.powersgd(rank=R)`` (one rank everywhere) and with ``layerwise=True`` (per-type
  ranks by L-GreCo's DP under the error budget of rank R); one round of two allreduces;
- ``ddp_powersgd`` (LM only): the peer a user would pick instead, PyTorch DDP (gloo backend,
  over the same emulated link) with torch's own ``powerSGD_hook`` at the same rank, error
  feedback and warm start on, ``min_compression_rate`` 2, same-shape batching, and the same
  QODA update. Its bytes are derived from the hook's own element counts (two ring allreduces).
  Not for the WGAN-GP: its gradient penalty needs double backward, which DDP does not support.

DDP rows (LM only, kept apart under ``"ddp"``, same gloo group and links, same QODA update,
DDP's default 25 MB buckets): ``ddp_fp32`` (no hook: DDP's float32 allreduce), ``ddp_fp16``
(torch's ``fp16_compress_hook``), ``ddp_qoda_layerwise`` (:func:`qoda_hvd.ddp.layerwise_hook`,
the same bits, levels and codec policy as the quantized rows above) and ``ddp_qoda_powersgd``
(:func:`qoda_hvd.ddp.powersgd_hook`, per-type ranks under the budget of rank R, from step 2 as
torch's row). Bytes: the allreduce rows' are derived (ring); the layer-wise hook's counted
(its payloads; received = the others' payloads); the PowerSGD hook's derived from its float
counts (two ring allreduces), as torch's row.

Both quantized methods use the same bits, level family (``optimal``), bucket size and codec
policy (``coding="auto"`` told the link rate), so they differ only in the typing and in the
number of exchanges. Each step is timed between barriers; the per-phase times come from
``compression_stats()``; logical bytes from the communicator's counts (Horovod's are derived
from tensor sizes as a ring allreduce moves them); wire bytes from the node's ``eth0`` counters
(emulated runs only: there every rank owns its network namespace).

Then a time-to-target run on a communication-heavy monotone game (see :class:`DiagonalGame`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WGAN_EXAMPLE = ROOT / "examples" / "wgan_gp.py"

#: Methods of the per-step comparison, in table order.
STEP_METHODS = ("hvd_fp32", "hvd_fp16", "eg_global", "qoda_allgather", "qoda_overlap",
                "qoda_overlap_mpi", "qoda_probed", "qoda_scatter_gather", "qoda_fallback",
                "qoda_two_level", "qoda_two_level_mpi")
#: Low-rank methods, reported apart (``"lowrank"``); ``ddp_powersgd`` on the LM only.
LOWRANK_METHODS = ("psgd_global", "psgd_layerwise", "ddp_powersgd")
#: Warm-up iterations a method needs before its steady state is timed (the fallback's probe;
#: torch's hook allreduces plainly until ``start_powerSGD_iter`` = 2, the least it allows).
MIN_WARMUP = {"qoda_fallback": 8, "qoda_probed": 16, "ddp_powersgd": 3,
              "ddp_qoda_powersgd": 3}
#: DDP rows (LM only; reported apart, ``"ddp"``): torch's DDP with no hook, its fp16 hook, and
#: qoda_hvd.ddp's two hooks.
DDP_METHODS = ("ddp_fp32", "ddp_fp16", "ddp_qoda_layerwise", "ddp_qoda_powersgd")
#: Methods of the time-to-target comparison.
VI_METHODS = ("hvd_fp32", "eg_global", "qoda_layerwise")


# ------------------------------------------------------------------------------------ models
class _UpBlock(nn.Module):
    """Residual block doubling the resolution (nearest upsampling), LayerNorm-style GroupNorm(1)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, ch), nn.GroupNorm(1, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        up = nn.functional.interpolate(x, scale_factor=2)
        h = self.conv1(nn.functional.interpolate(torch.relu(self.norm1(x)), scale_factor=2))
        return up + self.conv2(torch.relu(self.norm2(h)))


class _DownBlock(nn.Module):
    """Residual block of the critic, halving the resolution when ``down`` (no normalisation:
    the gradient penalty is per sample)."""

    def __init__(self, cin: int, ch: int, down: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.skip = nn.Conv2d(cin, ch, 1)
        self.down = down

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(torch.relu(x))))
        s = self.skip(x)
        if self.down:
            h, s = nn.functional.avg_pool2d(h, 2), nn.functional.avg_pool2d(s, 2)
        return h + s


class StandInGenerator(nn.Module):
    """Stand-in ResNet generator for 32x32x3 (used only when examples/wgan_gp.py has no builders)."""

    def __init__(self, ch: int = 128, latent: int = 128) -> None:
        super().__init__()
        self.ch = ch
        self.fc = nn.Linear(latent, 4 * 4 * ch)
        self.blocks = nn.Sequential(_UpBlock(ch), _UpBlock(ch), _UpBlock(ch))
        self.norm = nn.GroupNorm(1, ch)
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z):
        h = self.blocks(self.fc(z).view(-1, self.ch, 4, 4))
        return torch.tanh(self.out(torch.relu(self.norm(h))))


class StandInCritic(nn.Module):
    """Stand-in ResNet critic for 32x32x3 (used only when examples/wgan_gp.py has no builders)."""

    def __init__(self, ch: int = 128) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_DownBlock(3, ch, True), _DownBlock(ch, ch, True),
                                    _DownBlock(ch, ch, False), _DownBlock(ch, ch, False))
        self.fc = nn.Linear(ch, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.blocks(x)).mean(dim=(2, 3))).squeeze(1)


def _example_builders() -> tuple[Optional[Callable], Optional[Callable], str]:
    """Generator and critic builders of examples/wgan_gp.py, when it has them."""
    if not WGAN_EXAMPLE.exists():
        return None, None, f"stand-in ResNet G/D ({WGAN_EXAMPLE.relative_to(ROOT)} does not exist)"
    spec = importlib.util.spec_from_file_location("qoda_e2e_wgan_example", WGAN_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the example is someone else's file: fall back, and say why
        return None, None, f"stand-in ResNet G/D (importing {WGAN_EXAMPLE.name} failed: {e!r})"
    gen = next((getattr(module, n) for n in ("build_generator", "make_generator", "Generator")
                if callable(getattr(module, n, None))), None)
    crit = next((getattr(module, n) for n in ("build_critic", "make_critic", "build_discriminator",
                                              "Critic", "Discriminator")
                 if callable(getattr(module, n, None))), None)
    if gen is None or crit is None:
        return None, None, (f"stand-in ResNet G/D ({WGAN_EXAMPLE.name} has no generator/critic "
                            f"builders)")
    return gen, crit, f"examples/wgan_gp.py {gen.__name__} / {crit.__name__}"


def build_gan(ch: int, latent: int, use_example: bool = True) -> tuple[nn.ModuleDict, str]:
    """``ModuleDict(G=..., D=...)`` at CIFAR size and where the builders came from."""
    gen, crit, source = _example_builders() if use_example else (None, None, "stand-in ResNet G/D")
    if gen is not None:
        try:
            return nn.ModuleDict({"G": _call_builder(gen, ch=ch, latent=latent),
                                  "D": _call_builder(crit, ch=ch, latent=latent)}), source
        except Exception as e:
            source = f"stand-in ResNet G/D (the example's builders failed: {e!r})"
    return nn.ModuleDict({"G": StandInGenerator(ch, latent), "D": StandInCritic(ch)}), source


def _call_builder(fn: Callable, ch: int, latent: int) -> nn.Module:
    import inspect

    params = inspect.signature(fn).parameters
    kwargs = {}
    for name in params:
        if name == "channels" and "filters" in params:
            kwargs[name] = 3  # image channels: the bench's batches are CIFAR-shaped
        elif name == "side":
            kwargs[name] = 32
        elif name in ("ch", "channels", "width", "filters", "base_channels", "dim", "nf"):
            kwargs[name] = ch
        elif name in ("latent", "latent_dim", "z_dim", "nz", "noise_dim"):
            kwargs[name] = latent
    return fn(**kwargs)


def gan_latent(gan: nn.ModuleDict, default: int) -> int:
    """Latent size the generator takes (its first Linear's in_features), else ``default``."""
    first = next((m for m in gan["G"].modules() if isinstance(m, nn.Linear)), None)
    return first.in_features if first is not None else default


def make_gan_step(gan: nn.ModuleDict, batch: int, latent: int, generator: torch.Generator,
                  penalty: float = 10.0) -> Callable[[], None]:
    """One WGAN-GP oracle call: ONE backward gives the game field.

    ``loss = D(fake) - D(real) + penalty * GP`` descended by D; G's gradient of the same loss is
    that of ``D(fake)``, which G ascends (its parameter group has ``maximize=True``), i.e. G
    descends ``-D(fake)``: the stacked (grad_G, grad_D) field of the zero-sum game.
    """
    G, D = gan["G"], gan["D"]

    def step() -> None:
        real = torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1  # CIFAR-shaped batch
        z = torch.randn(batch, latent, generator=generator)
        fake = G(z)
        eps = torch.rand(batch, 1, 1, 1, generator=generator)
        mix = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(mix).sum(), mix, create_graph=True)
        gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
        loss = D(fake).mean() - D(real).mean() + penalty * gp
        loss.backward()

    return step


def gan_groups(gan: nn.ModuleDict) -> list[dict]:
    return [{"params": list(gan["G"].parameters()), "maximize": True},
            {"params": list(gan["D"].parameters())}]


class TinyLM(nn.Module):
    """Communication-heavy causal transformer LM: most parameters are in the (untied) token
    embedding and output head, as in large-vocabulary language models."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, nhead=max(1, d // 64), dim_feedforward=4 * d,
                                       dropout=0.0, batch_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq),
                             persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def make_lm_step(lm: TinyLM, batch: int, seq: int, vocab: int,
                 generator: torch.Generator) -> Callable[[], None]:
    def step() -> None:
        tokens = torch.randint(vocab, (batch, seq + 1), generator=generator)
        logits = lm(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()

    return step


# ---------------------------------------------------------------------------------- the game
class DiagonalGame(nn.Module):
    r"""Regularised bilinear game with a diagonal coupling, O(d) per oracle call.

    :math:`\min_x \max_y \sum_i a_i \tilde x_i \tilde y_i + \frac\mu2\lVert\tilde x\rVert^2
    - \frac\mu2\lVert\tilde y\rVert^2` with :math:`\tilde x = x - x^\star`, so
    :math:`A(x, y) = (\mu\tilde x + a\odot\tilde y,\ \mu\tilde y - a\odot\tilde x)`:
    :math:`\mu`-strongly monotone, solution :math:`(x^\star, y^\star)`. Two blocks (``dense``:
    Gaussian start error; ``sparse``: 1% of coordinates off by 10) give two distributions of
    normalised gradient coordinates, i.e. two layer types. Parameters are ``(rows, 1024)``
    matrices so every one is quantized. Absolute noise: each rank adds
    :math:`\sigma\xi`, :math:`\xi\sim N(0, I)` from its own generator.
    """

    def __init__(self, rows: int, mu: float, sigma: float, generator: torch.Generator) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.names = ("dense.x", "dense.y", "sparse.x", "sparse.y")
        self.blocks = nn.ModuleDict()
        for block in ("dense", "sparse"):
            mod = nn.Module()
            for who in ("x", "y"):
                star = torch.randn(rows, 1024, generator=generator)
                if block == "dense":
                    err = torch.randn(rows, 1024, generator=generator)
                else:
                    err = 10.0 * (torch.rand(rows, 1024, generator=generator) < 0.01).float()
                mod.register_buffer(f"{who}_star", star)
                mod.register_parameter(who, nn.Parameter(star + err))
            mod.register_buffer("a", 0.5 + torch.rand(rows, 1024, generator=generator))
            self.blocks[block] = mod

    def operator_(self, generator: Optional[torch.Generator]) -> None:
        """Write the (noisy) operator into ``.grad`` through a surrogate backward (so the
        wrappers' gradient hooks fire exactly as for a model)."""
        terms = []
        for mod in self.blocks.values():
            ex, ey = mod.x.detach() - mod.x_star, mod.y.detach() - mod.y_star
            gx = ex.mul(self.mu).addcmul_(mod.a, ey)
            gy = ey.mul(self.mu).addcmul_(mod.a, ex, value=-1.0)
            if generator is not None and self.sigma > 0:
                gx.add_(torch.randn(gx.shape, generator=generator), alpha=self.sigma)
                gy.add_(torch.randn(gy.shape, generator=generator), alpha=self.sigma)
            terms += [(mod.x * gx).sum(), (mod.y * gy).sum()]
        torch.stack(terms).sum().backward()

    @torch.no_grad()
    def distance(self, points: Optional[list[torch.Tensor]] = None) -> float:
        """:math:`\\lVert z - z^\\star\\rVert` at ``points`` (parameter order) or the parameters."""
        stars = [t for m in self.blocks.values() for t in (m.x_star, m.y_star)]
        params = list(self.parameters()) if points is None else points
        return math.sqrt(sum(float((p - s).square().sum()) for p, s in zip(params, stars)))


# ------------------------------------------------------------------------------ measurement
def _wire_counters() -> Optional[tuple[int, int]]:
    base = Path("/sys/class/net/eth0/statistics")
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except OSError:
        return None


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    # Module initialisers draw from the global generator: fork it so nothing else is disturbed,
    # and every rank and method starts from the same weights (no broadcast needed).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


class Method:
    """A built optimizer for one method, with how to run one iteration."""

    def __init__(self, name: str, model: nn.Module, groups, cfg: dict, link_bytes_per_s,
                 step_size: str, lr: float) -> None:
        import horovod.torch as hvd

        import qoda_hvd

        self.name = name
        self.model = model
        self.extragradient = name.startswith("eg")
        named = list(model.named_parameters())
        if self.extragradient:
            base = qoda_hvd.ExtraGradient(groups, lr=lr, step_size=step_size)
        else:
            base = qoda_hvd.QODA(groups, lr=lr, step_size=step_size)
        bits, levels = cfg["bits"], cfg["levels"]
        if name == "compute":
            self.opt, self.kind = base, "plain"
        elif name == "ddp_powersgd" or name in DDP_METHODS:
            self.opt, self.kind = base, "ddp"
            self.hook_state = model.hook_state  # the DDP wrapper's hook state (or None)
        elif name.startswith("psgd"):
            comp = qoda_hvd.Compression.powersgd(rank=cfg.get("psgd_rank", 8),
                                                 types=cfg.get("types") or model,
                                                 layerwise=name == "psgd_layerwise")
            self.opt = qoda_hvd.DistributedOptimizer(base, named_parameters=named,
                                                     compression=comp)
            self.kind = "qoda"
        elif name.startswith("hvd"):
            comp = hvd.Compression.fp16 if name == "hvd_fp16" else hvd.Compression.none
            self.opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=comp)
            self.opt.step_size_policy = base.step_size_policy  # Horovod rebuilds with defaults
            self.kind = "horovod"
        else:
            types = {"*": "feedforward"} if name == "eg_global" else cfg.get("types") or model
            exchange = {"qoda_allgather": "allgather", "qoda_overlap": "allgather",
                        "qoda_overlap_mpi": "allgather", "qoda_probed": "allgather",
                        "qoda_scatter_gather": "scatter_gather",
                        "qoda_two_level": "hierarchical",
                        "qoda_two_level_mpi": "hierarchical"}.get(name, "auto")
            communicator = None
            if name in ("qoda_overlap_mpi", "qoda_two_level_mpi"):  # made on every rank in
                # the same order (collective); two-level: its groups are MPI_Comm_splits
                from qoda_hvd.comm import MPICommunicator

                communicator = MPICommunicator()
            comp = qoda_hvd.Compression.layerwise(bits=bits, levels=levels, coding=cfg["coding"],
                                                  types=types, bandwidth=link_bytes_per_s,
                                                  fallback=name == "qoda_fallback")
            self.opt = qoda_hvd.DistributedOptimizer(base, named_parameters=named,
                                                     compression=comp, exchange=exchange,
                                                     overlap=(None if name == "qoda_probed"
                                                              else name.startswith("qoda_overlap")),
                                                     communicator=communicator,
                                                     bucket_cap_mb=cfg.get("bucket_cap_mb"))
            self.kind = "qoda"
        self.numel = sum(p.numel() for _, p in named if p.requires_grad)

    def iterate(self, oracle: Callable[[], None]) -> None:
        opt = self.opt
        opt.zero_grad()
        oracle()
        if self.extragradient:
            opt.extrapolation()
            opt.zero_grad()
            oracle()
        opt.step()

    def phase_times(self) -> dict:
        if self.kind == "ddp":
            st = self.hook_state
            if st is None:  # DDP's own allreduce, or its fp16 hook
                return {}
            if hasattr(st, "total_numel_after_compression"):  # torch's: P + Q + uncompressed
                return {"ddp_numel": st.total_numel_after_compression}
            if self.name == "ddp_qoda_powersgd":
                return {"ddp_numel": st.stats.numel_after}
            h = st.stats  # the layer-wise hook: its payloads and phases
            return {"enc_bytes": h.payload_bytes, "coords": h.coordinates,
                    "qenc": h.quantize_s + h.encode_s, "exch": h.lengths_s + h.exchange_s,
                    "dec": h.decode_s,
                    "sent": h.payload_bytes, "recv": h.bytes_received,
                    "strategy": "ddp layerwise_hook"}
        if self.kind != "qoda":
            return {}
        s = self.opt.compression_stats()
        st = self.opt._exchange.stats  # per-row bits: the cumulative figure mixes in warm-up
        return {"enc_bytes": st.encoded_bytes, "coords": st.coordinates,
                "qenc": s["time_quantize_s"] + s["time_encode_s"], "exch": s["time_exchange_s"],
                "dec": s["time_decode_s"], "sent": s["bytes_sent"], "recv": s["bytes_received"],
                "exchanges": s["exchanges"], "bits": s["bits_per_coordinate"],
                "strategy": s["strategy"], "sends": s.get("sends"), "overlap": s.get("overlap")}


def time_methods(methods: list, warmup: int, steps: int, wire: bool) -> list[dict]:
    """Per-iteration records of this rank for each ``(method, oracle)``, interleaved: round r
    times iteration r of every method in turn, so drift on a shared machine hits all alike.
    A barrier precedes each timed iteration; phases and bytes are deltas around it."""
    import horovod.torch as hvd

    for method, oracle in methods:
        for _ in range(max(warmup, MIN_WARMUP.get(method.name, 0))):
            method.iterate(oracle)
    records = [{"rows": []} for _ in methods]
    for _ in range(steps):
        for (method, oracle), rec in zip(methods, records):
            use_wire = wire and method.kind != "plain"
            hvd.barrier()
            p0, w0 = method.phase_times(), _wire_counters() if use_wire else None
            t0 = time.perf_counter()
            method.iterate(oracle)
            elapsed = time.perf_counter() - t0
            p1, w1 = method.phase_times(), _wire_counters() if use_wire else None
            row = {"time": elapsed}
            for key in ("qenc", "exch", "dec", "sent", "recv", "exchanges", "enc_bytes", "coords",
                        "ddp_numel"):
                if key in p1:
                    row[key] = p1[key] - p0[key]
            if w0 is not None and w1 is not None:
                row["wire_tx"], row["wire_rx"] = w1[0] - w0[0], w1[1] - w0[1]
            rec["rows"].append(row)
    for (method, _), rec in zip(methods, records):
        last = method.phase_times()
        rec.update(bits=last.get("bits"), strategy=last.get("strategy"), sends=last.get("sends"),
                   overlap=last.get("overlap"))
    return records


def summarise(per_rank: list[dict], name: str, numel: int, k: int, compute_s: Optional[float],
              extragradient: bool, link_bytes_per_s: Optional[float] = None) -> dict:
    """Median over iterations of the slowest rank's time; phases and bytes averaged over ranks."""
    steps = len(per_rank[0]["rows"])
    step_time = statistics.median(max(r["rows"][i]["time"] for r in per_rank) for i in range(steps))

    def med(key):
        vals = [statistics.median(row[key] for row in r["rows"]) for r in per_rank
                if key in r["rows"][0]]
        return sum(vals) / len(vals) if vals else None

    out = {"method": name, "step_s": step_time, "numel": numel, "steps_timed": steps,
           "exchanges_per_iteration": 2 if extragradient else 1,
           "bits_per_coordinate": per_rank[0].get("bits"), "strategy": per_rank[0].get("strategy"),
           "sends": per_rank[0].get("sends"), "overlap": per_rank[0].get("overlap")}
    rows = per_rank[0]["rows"]
    if rows and "coords" in rows[0] and sum(r["coords"] for r in rows):
        # Over the timed iterations only (the fallback's probe sends float32 in its warm-up).
        out["bits_per_coordinate"] = 8.0 * sum(r["enc_bytes"] for r in rows) / sum(r["coords"] for r in rows)
    if name == "compute":
        out.update(compute_s=step_time, qenc_s=0.0, exchange_s=0.0, decode_s=0.0,
                   bytes_sent=0, bytes_received=0, bytes_source="no communication")
    elif name in ("ddp_fp32", "ddp_fp16"):
        width = 2 if name == "ddp_fp16" else 4
        ring = 2 * (k - 1) * numel * width // k
        out.update(bytes_sent=ring, bytes_received=ring, bytes_source="derived (ring allreduce)",
                   strategy="ddp allreduce" if width == 4 else "ddp fp16_compress_hook",
                   bits_per_coordinate=8.0 * width, compute_s=compute_s, qenc_s=0.0,
                   decode_s=0.0)
        out["exchange_s"] = None if compute_s is None else max(step_time - compute_s, 0.0)
    elif name in ("ddp_powersgd", "ddp_qoda_powersgd"):
        floats = med("ddp_numel")  # a plain allreduce on a step would show up here: none timed
        ring = 2 * (k - 1) * 4 * floats / k
        out.update(bytes_sent=ring, bytes_received=ring,
                   strategy="ddp powerSGD_hook" if name == "ddp_powersgd" else "ddp powersgd_hook",
                   bytes_source="derived (the hook's element counts, ring allreduces)",
                   bits_per_coordinate=32.0 * floats / numel)
        out["compute_s"] = compute_s
        out["exchange_s"] = None if compute_s is None else max(step_time - compute_s, 0.0)
        out["qenc_s"] = out["decode_s"] = 0.0
    elif name.startswith("hvd"):
        width = 2 if name == "hvd_fp16" else 4
        ring = 2 * (k - 1) * numel * width // k  # what a ring allreduce moves per rank
        out.update(bytes_sent=ring, bytes_received=ring, bytes_source="derived (ring allreduce)",
                   strategy="allreduce", bits_per_coordinate=8.0 * width)
        out["compute_s"] = compute_s
        out["exchange_s"] = None if compute_s is None else max(step_time - compute_s, 0.0)
        out["qenc_s"] = out["decode_s"] = 0.0
    elif name == "ddp_qoda_layerwise":
        # the hook's phases run on its worker while backward goes on: summed per bucket, they
        # overlap compute, so compute is the compute-only row's
        out.update(bytes_sent=med("sent"), bytes_received=med("recv"),
                   bytes_source="counted (the hook's payloads)", strategy="ddp layerwise_hook",
                   qenc_s=med("qenc"), exchange_s=med("exch"), decode_s=med("dec"),
                   compute_s=compute_s)
    else:
        out.update(bytes_sent=med("sent"), bytes_received=med("recv"),
                   bytes_source="counted (communicator)")
        qenc, exch, dec = med("qenc"), med("exch"), med("dec")
        out.update(qenc_s=qenc, exchange_s=exch, decode_s=dec,
                   compute_s=max(step_time - qenc - exch - dec, 0.0))
    wire_tx, wire_rx = med("wire_tx"), med("wire_rx")
    if wire_tx is not None:
        out.update(wire_tx_bytes=wire_tx, wire_rx_bytes=wire_rx)
    if name != "compute" and compute_s is not None:
        # What communication adds to the step (iteration minus compute-only), next to the time
        # its bytes need on the link: the overlap is the gap between the two.
        out["exposed_s"] = max(step_time - compute_s, 0.0)
    if name != "compute" and link_bytes_per_s and out.get("bytes_received") is not None:
        out["wire_s"] = out["bytes_received"] / link_bytes_per_s
    return out


def run_model(model_name: str, cfg: dict, link_bytes, wire: bool) -> dict:
    import horovod.torch as hvd

    k, rank = hvd.size(), hvd.rank()
    spec = cfg["models"][model_name]
    data_gen = torch.Generator().manual_seed(10_000 + rank)
    source = None
    if model_name == "wgan_gp":
        def build():
            nonlocal source
            gan, source = build_gan(spec["ch"], spec["latent"], cfg.get("use_example", True))
            return gan

        def bind(model):
            return make_gan_step(model, spec["batch"], gan_latent(model, spec["latent"]),
                                 data_gen), gan_groups(model)
        lr = 2e-4
    else:
        def build():
            return TinyLM(spec["vocab"], spec["d"], spec["layers"], spec["seq"])

        def bind(model):
            return (make_lm_step(model, spec["batch"], spec["seq"], spec["vocab"], data_gen),
                    list(model.parameters()))
        lr = 1e-3
    names = ("compute",) + tuple(m for m in STEP_METHODS if m in cfg["methods"])
    lowrank = [m for m in LOWRANK_METHODS if m in cfg.get("lowrank_methods", ())]
    if model_name != "lm" or ("ddp_powersgd" in lowrank and not _gloo_group(cfg)):
        lowrank = [m for m in lowrank if m != "ddp_powersgd"]
    ddp_rows = [m for m in DDP_METHODS if m in cfg.get("ddp_methods", ())]
    if not cfg.get("psgd_rank", 8):
        ddp_rows = [m for m in ddp_rows if m != "ddp_qoda_powersgd"]
    if model_name != "lm" or (ddp_rows and not _gloo_group(cfg)):
        ddp_rows = []
    methods = []
    for name in names + tuple(lowrank) + tuple(ddp_rows):
        model = _seeded(build, 0)
        if name == "ddp_powersgd" or name in DDP_METHODS:
            ddp = (_ddp_powersgd(model, cfg.get("psgd_rank", 8)) if name == "ddp_powersgd"
                   else _ddp_row(model, name, cfg, link_bytes))
            oracle, groups = bind(ddp)
            model = ddp
        else:
            oracle, groups = bind(model)
        methods.append((Method(name, model, groups, cfg, link_bytes, "adaptive", lr), oracle))
    records = time_methods(methods, cfg["warmup"], cfg["steps"], wire)
    results, low, ddp_out, compute_s = {}, {}, {}, None
    for (method, _), rec in zip(methods, records):
        per_rank = hvd.allgather_object(rec)
        summary = summarise(per_rank, method.name, method.numel, k, compute_s,
                            method.extragradient, link_bytes)
        if method.name == "compute":
            compute_s = summary["step_s"]
        if method.kind == "qoda" and method.name.startswith("psgd"):
            summary["ranks"] = dict(method.opt._exchange.ranks)
            summary["psgd_rank"] = cfg.get("psgd_rank", 8)
        if method.name in ("ddp_powersgd", "ddp_qoda_powersgd"):
            summary["psgd_rank"] = cfg.get("psgd_rank", 8)
        if method.name == "ddp_qoda_powersgd":
            summary["ranks"] = dict(method.hook_state.ranks)
        (low if method.name in LOWRANK_METHODS else
         ddp_out if method.name in DDP_METHODS else results)[method.name] = summary
        if rank == 0:
            print(f"  [{model_name}] {method.name:<20} {summary['step_s'] * 1e3:9.1f} ms/iteration",
                  flush=True)
    del methods
    out = {"source": source or "transformer LM (bench/e2e_worker.py TinyLM)",
           "params": results["compute"]["numel"], "spec": spec, "methods": results}
    if low:
        out["lowrank"] = low
    if ddp_out:
        out["ddp"] = ddp_out
    return out


_GLOO: dict = {}


def _own_address(wire: bool) -> str:
    """This rank's address for torch.distributed: its emulated node's eth0, else loopback."""
    if not wire:
        return "127.0.0.1"
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"eth0"))  # SIOCGIFADDR
    return socket.inet_ntoa(packed[20:24])


def _gloo_group(cfg: dict) -> bool:
    """A torch.distributed gloo group over the same ranks and links, once per job. Every rank
    reports whether it joined, so all take the same branch (none waits for a peer that gave up)."""
    if "ok" in _GLOO:
        return _GLOO["ok"]
    import datetime
    import socket

    import horovod.torch as hvd
    import torch.distributed as dist

    err = None
    try:
        wire = bool(cfg.get("wire_counters"))
        addr = _own_address(wire)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0" if wire else "lo")
        port = 0
        if hvd.rank() == 0:
            with socket.socket() as s:
                s.bind((addr, 0))
                port = s.getsockname()[1]
        root, port = hvd.broadcast_object((addr, port), root_rank=0, name="e2e.gloo.addr")
        dist.init_process_group("gloo", init_method=f"tcp://{root}:{port}", rank=hvd.rank(),
                                world_size=hvd.size(), timeout=datetime.timedelta(seconds=60))
    except Exception as e:  # reported in the table, never a hang
        err = f"{type(e).__name__}: {e}"
    oks = hvd.allgather_object(err is None)
    _GLOO["ok"] = all(oks)
    if not _GLOO["ok"]:
        if hvd.rank() == 0:
            print(f"  ddp_powersgd skipped: a rank could not join the gloo group ({err})", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    return _GLOO["ok"]


def _ddp_powersgd(model: nn.Module, rank: int) -> nn.Module:
    """``model`` in DDP (gloo) with torch's ``powerSGD_hook``: rank ``rank``, error feedback and
    warm start on, PowerSGD from step 2 (the least torch allows with them).

    ONE bucket (``bucket_cap_mb`` above the model's size): the hook issues its P and Q
    allreduces from future callbacks, and with several buckets the two ranks issued them in
    different orders over gloo (an abort: "Received data size doesn't match expected size").
    One bucket is also what the QODA rows do (no overlap with the backward pass).
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    cap_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20 + 1
    try:  # the mask buffer is the same everywhere: no per-step buffer broadcast
        ddp = DDP(model, bucket_cap_mb=cap_mb, forward_sync_buffers=False)
    except TypeError:  # torch before forward_sync_buffers
        ddp = DDP(model, bucket_cap_mb=cap_mb, broadcast_buffers=False)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                               start_powerSGD_iter=2, min_compression_rate=2,
                               use_error_feedback=True, warm_start=True,
                               orthogonalization_epsilon=1e-8,
                               batch_tensors_with_same_shape=True)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
    ddp.hook_state = state
    return ddp


def _ddp_row(model: nn.Module, name: str, cfg: dict, link_bytes) -> nn.Module:
    """``model`` in DDP (gloo, DDP's default buckets) with the row's hook; ``hook_state`` on
    the wrapper (None for DDP's own allreduce and its fp16 hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import qoda_hvd.ddp as qddp

    cap = cfg.get("bucket_cap_mb") or 25.0
    try:  # the mask buffer is the same everywhere: no per-step buffer broadcast
        ddp = DDP(model, bucket_cap_mb=cap, forward_sync_buffers=False)
    except TypeError:  # torch before forward_sync_buffers
        ddp = DDP(model, bucket_cap_mb=cap, broadcast_buffers=False)
    state = None
    if name == "ddp_fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "ddp_qoda_layerwise":
        state = qddp.LayerwiseHookState(model=model, bits=cfg["bits"], levels=cfg["levels"],
                                        coding=cfg["coding"], types=cfg.get("types"),
                                        bandwidth=link_bytes)
        ddp.register_comm_hook(state, qddp.layerwise_hook)
    elif name == "ddp_qoda_powersgd":
        state = qddp.PowerSGDHookState(model=model, rank=cfg.get("psgd_rank", 8),
                                       layerwise=True, start_iter=2, types=cfg.get("types"))
        ddp.register_comm_hook(state, qddp.powersgd_hook)
    ddp.hook_state = state
    return ddp


def run_vi(cfg: dict, link_bytes, wire: bool) -> dict:
    """Time (sum of iteration times, checks excluded) until distance < target * initial."""
    import horovod.torch as hvd

    spec = cfg["vi"]
    rank = hvd.rank()
    out = {"spec": spec, "methods": {}}
    for name in VI_METHODS:
        if name not in cfg["vi_methods"]:
            continue
        game = DiagonalGame(spec["rows"], spec["mu"], spec["sigma"],
                            torch.Generator().manual_seed(7))
        noise = torch.Generator().manual_seed(20_000 + rank)
        params = list(game.parameters())
        vi_cfg = dict(cfg, types={"dense.*": "dense", "sparse.*": "sparse"})
        method = Method("eg_global" if name == "eg_global" else
                        ("hvd_fp32" if name == "hvd_fp32" else "qoda_vi"),
                        game, params, vi_cfg, link_bytes, "constant", spec["lr"])
        d0 = game.distance()
        target = spec["target"] * d0
        oracle = lambda: game.operator_(noise)  # noqa: E731
        elapsed, iters, dist, reached = 0.0, 0, d0, False
        p0, w0 = method.phase_times(), _wire_counters() if wire else None
        while iters < spec["max_iterations"] and elapsed < spec["max_seconds"]:
            hvd.barrier()
            t0 = time.perf_counter()
            method.iterate(oracle)
            elapsed += time.perf_counter() - t0
            iters += 1
            point = None if method.extragradient else method.opt.base_iterates()
            dist = game.distance(point)
            # Rank 0's decision for all (the wrappers leave identical parameters anyway).
            flag = hvd.broadcast(torch.tensor([float(dist < target)]), 0)
            if flag.item() > 0:
                reached = True
                break
        p1, w1 = method.phase_times(), _wire_counters() if wire else None
        times = hvd.allgather_object(elapsed)
        row = {"method": name, "reached": reached, "iterations": iters, "seconds": max(times),
               "initial_distance": d0, "final_distance": dist, "target_distance": target,
               "seconds_per_iteration": max(times) / max(iters, 1)}
        if p1:
            row["bytes_sent_per_iteration"] = (p1["sent"] - p0["sent"]) / max(iters, 1)
        else:
            row["bytes_sent_per_iteration"] = 2 * (hvd.size() - 1) * 4 * method.numel // hvd.size()
        if w0 is not None and w1 is not None:
            row["wire_tx_per_iteration"] = (w1[0] - w0[0]) / max(iters, 1)
        out["methods"][name] = row
        if rank == 0:
            print(f"  [vi] {name:<20} {'reached' if reached else 'NOT reached'} after {iters} "
                  f"iterations, {max(times):.2f} s", flush=True)
        del method, game
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file written by bench/e2e.py")
    parser.add_argument("--out", required=True, help="where rank 0 writes the results (JSON)")
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    torch.set_num_threads(1)
    # One compute thread per rank for numba's kernels too (before they are imported): the
    # emulated nodes share this machine's cores, and oversubscribed parallel loops crawl.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    import horovod.torch as hvd

    hvd.init()
    link = cfg.get("link_bytes_per_s")
    wire = bool(cfg.get("wire_counters"))
    # the layout asked for (an unshaped run's local ranks all share one real node)
    per_node = int(cfg.get("ranks_per_node", 1))
    result = {"bandwidth": cfg["bandwidth"], "nodes": hvd.size() // per_node, "ranks": hvd.size(),
              "ranks_per_node": per_node, "models": {}}
    t0 = time.perf_counter()
    for model_name in cfg["models"]:
        result["models"][model_name] = run_model(model_name, cfg, link, wire)
    if cfg.get("vi"):
        result["vi"] = run_vi(cfg, link, wire)
    result["job_seconds"] = time.perf_counter() - t0
    if hvd.rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
