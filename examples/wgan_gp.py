"""WGAN-GP trained as a variational inequality with compressed gradient exchange: on real
handwritten digits by default (minutes on 2 CPU cores), on CIFAR-10/100 with ``--data DIR``.

ResNet generator and critic (LayerNorm in the critic, gradient penalty 10), the setup of
ALGORITHM.md section 5 (``--filters`` 128, latent 128 at 32x32; 32 and 32 for the 8x8
digits), trained with QODA, optimistic Adam or extra-gradient through ONE
:func:`qoda_hvd.DistributedOptimizer` over both players.

The game as one VI. The critic D minimises ``L_D = E D(G(z)) - E D(x) + 10 GP`` and the
generator G minimises ``L_G = -E D(G(z))``; the VI operator is the stacked field
``V = (grad_G L_G, grad_D L_D)``, the ``(grad_G, -grad_D)`` field of ALGORITHM.md section 1
(``grad_D L_D`` is minus the gradient of the critic's objective). Each iteration takes both
players' gradients at the same point, with one critic forward pass on real and fake images:
``L_D.backward(inputs=D's params)`` then ``L_G.backward(inputs=G's params)`` (``inputs=``
keeps each loss out of the other player's gradient), so ``p.grad`` holds exactly ``V``. One
optimizer with two parameter groups (lr 2e-4 for D, 2e-5 for G; QODA adapts each group's step
separately) then takes a simultaneous step for both players, and the wrapper exchanges the
whole field at once:

- ``qoda`` / ``optimistic-adam``: ONE exchange per iteration (both players together);
- ``extragradient``: TWO (the field at x_t for the extrapolation, then at x_{t+1/2}).

Two optimizers, one per player, would cost two exchanges per iteration for the same math.
Parameter names carry the player: ``G.*`` and ``D.*``; layer types come from the modules
(convolutions, the generator's input Linear as feed-forward; small tensors uncompressed).

Data (``--data``): ``digits`` (default) is scikit-learn's 1,797 8x8 handwritten digits, which
ship inside its wheel (``examples/digits.py``: 1,397 to train on, 400 held out); a directory
reads the CIFAR python batches (no torchvision, nothing downloaded); ``synthetic`` is a labelled
set of coloured shapes at 32x32. Each rank samples its own minibatches (its own generator per
step). Outputs under ``--out`` (rank 0): sample grids ``samples_<step>.png``, ``metrics.csv``
(losses, Wasserstein estimate, penalty, for digits the FID analogue, compression), TensorBoard
scalars if the package is installed, ``checkpoint.pt`` (``--resume`` continues the step count).

Quality at the end. Digits: the FID analogue of ``examples/digits.py`` (Frechet distance of a
digits classifier's features, generated vs held-out digits; not Inception-FID, comparable only
with itself), printed with its value at the start and the score of real training digits, the
classifier's label entropy and the digits covered; also every ``--sample-every`` steps in the
CSV. 32x32: FID and Inception Score when torch-fidelity and its Inception weights are on disk
(``--inception-weights``); otherwise the run says why.

Launch (2 local ranks)::

    mpirun -np 2 python examples/wgan_gp.py --out runs/wgan
    horovodrun -np 2 -H localhost:2 python examples/wgan_gp.py --data /data/cifar-10-batches-py --steps 50000 --out runs/wgan
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
import data as datasets  # noqa: E402
import digits  # noqa: E402

#: torch-fidelity's Inception-v3 weights file (its default name under torch.hub's checkpoints).
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
#: ALGORITHM.md section 5: Adam-type learning rates of the critic and the generator.
ADAM_LR_D, ADAM_LR_G = 2e-4, 2e-5
#: ``--data`` values that are not paths.
BUILTIN_DATA = ("digits", "synthetic")
#: Defaults that depend on the data: the 8x8 digits train a small model fast (the settings of
#: bench/quality_gan.py: width and latent 32, Adam-type rates 1e-3 for both players); CIFAR and
#: the synthetic 32x32 set take the paper's (ALGORITHM.md section 5).
DATA_DEFAULTS = {
    "digits": dict(filters=32, latent=32, lr_d=1e-3, lr_g=1e-3, fid_samples=400),
    "images32": dict(filters=128, latent=128, lr_d=ADAM_LR_D, lr_g=ADAM_LR_G, fid_samples=5000),
}


# -- models --------------------------------------------------------------------------------

class UpBlock(nn.Module):
    """Generator residual block: BN-ReLU-upsample-conv-BN-ReLU-conv, 1x1 conv shortcut."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.shortcut = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


def _up_blocks(side: int) -> int:
    """Up-blocks from the generator's 4x4 start to ``side`` (a power of two >= 8)."""
    if side < 8 or side & (side - 1):
        raise ValueError(f"side must be a power of two >= 8, got {side}")
    return int(math.log2(side)) - 2


class Generator(nn.Module):
    """ResNet generator: latent -> 4x4 -> up-blocks to ``side`` (three for 32x32, one for the
    8x8 digits) -> ``channels`` in [-1, 1]."""

    def __init__(self, filters: int = 128, latent: int = 128, side: int = 32,
                 channels: int = 3) -> None:
        super().__init__()
        self.filters = filters
        self.fc = nn.Linear(latent, 4 * 4 * filters)
        self.blocks = nn.Sequential(*(UpBlock(filters) for _ in range(_up_blocks(side))))
        self.bn = nn.BatchNorm2d(filters)
        self.to_rgb = nn.Conv2d(filters, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.fc(z).view(-1, self.filters, 4, 4))
        return torch.tanh(self.to_rgb(F.relu(self.bn(h))))


def layer_norm(ch: int) -> nn.Module:
    """LayerNorm over (C, H, W) with a per-channel gain and bias: ``GroupNorm(1, C)``. (An
    ``nn.LayerNorm([C, H, W])`` would carry C*H*W-element gains, which would then be typed and
    quantized as if they were weights.)"""
    return nn.GroupNorm(1, ch)


class DownBlock(nn.Module):
    """Critic residual block: (LN-ReLU-)conv-LN-ReLU-conv(-avgpool), 1x1 conv shortcut when the
    shape changes. The first block takes the image directly (no pre-activation)."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.first, self.down = first, down
        self.norm1 = None if first else layer_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = layer_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if (down or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(self.norm1(x))
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        s = x
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        if self.shortcut is not None:
            s = self.shortcut(s)
        return h + s


class Critic(nn.Module):
    """ResNet critic: down-blocks to a quarter of ``side`` at most 8 (32 -> 8 in two, 8 -> 4 in
    one), two blocks there, ReLU, mean pool, linear."""

    def __init__(self, filters: int = 128, side: int = 32, channels: int = 3) -> None:
        super().__init__()
        downs = max(1, _up_blocks(side) - 1)
        blocks = [DownBlock(channels, filters, down=True, first=True)]
        blocks += [DownBlock(filters, filters, down=True) for _ in range(downs - 1)]
        blocks += [DownBlock(filters, filters, down=False) for _ in range(2)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(filters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.blocks(x)).mean(dim=(2, 3))).squeeze(1)


class WGAN(nn.Module):
    """Both players in one module, so their parameters are named ``G.*`` and ``D.*``."""

    def __init__(self, filters: int = 128, latent: int = 128, side: int = 32,
                 channels: int = 3) -> None:
        super().__init__()
        self.latent = latent
        self.G = Generator(filters, latent, side, channels)
        self.D = Critic(filters, side, channels)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """``E (||grad_x D(x_hat)|| - 1)^2`` at random interpolates of real and (detached) fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=generator).to(real.device)
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


# -- FID / Inception Score -----------------------------------------------------------------

def inception_extractor(weights: Optional[str], device: torch.device):
    """torch-fidelity's Inception-v3 feature extractor, or ``(None, reason)``. Never downloads:
    the weights must already be on disk."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return None, "torch-fidelity is not installed (pip install torch-fidelity)"
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
    if not os.path.isfile(path):
        return None, (f"no Inception weights at {path}; put {INCEPTION_WEIGHTS} there or pass "
                      "--inception-weights FILE (nothing is downloaded)")
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=path)
    return extractor.to(device).eval(), None


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets ``[N, F]``: ``||mu_a - mu_b||^2 + tr(S_a + S_b -
    2 (S_a S_b)^(1/2))``, with ``tr (S_a S_b)^(1/2)`` from the eigenvalues of the symmetric
    ``S_a^(1/2) S_b S_a^(1/2)`` (float64).

    Example::

        >>> f = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> abs(frechet_distance(f, f)) < 1e-6
        True
    """
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(sa)
    root_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = root_a @ sb @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    return float(mu @ mu + sa.trace() + sb.trace() - 2 * cross)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp E_x KL(p(y|x) || p(y))``: mean and std over ``splits`` parts.

    Example::

        >>> round(inception_score(torch.zeros(20, 5), splits=2)[0], 6)  # uniform p(y|x)
        1.0
    """
    p = torch.softmax(logits.double(), dim=1)
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(scores) > 1 else 0.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def compute_metrics(ctx: common.Context, args, model: WGAN, real: torch.Tensor) -> dict[str, str]:
    """FID (against ``real``) and IS of ``--fid-samples`` generated images. Every rank
    extracts the features of its share; rank 0 combines them."""
    if args.fid_samples <= 0:
        return {"FID/IS": "skipped (--fid-samples 0)"}
    extractor, reason = inception_extractor(args.inception_weights, ctx.device)
    if extractor is None:
        ctx.print(f"FID/IS: not computed: {reason}")
        return {"FID/IS": "not computed (see above)"}
    n = min(args.fid_samples, real.shape[0])
    share = range(ctx.rank * n // ctx.size, (ctx.rank + 1) * n // ctx.size)
    gen = common.step_generator(args.seed, ctx.rank, common.EVALUATION_STEP)
    model.G.eval()
    feats_fake, logits_fake, feats_real = [], [], []
    for lo in range(share.start, share.stop, 100):
        hi = min(lo + 100, share.stop)
        z = torch.randn(hi - lo, model.latent, generator=gen).to(ctx.device)
        f, logits = extractor(to_uint8(model.G(z)))
        feats_fake.append(f.double().cpu())
        logits_fake.append(logits.double().cpu())
        feats_real.append(extractor(real[lo:hi].to(ctx.device))[0].double().cpu())
    model.G.train()

    def gather(parts, name):
        return ctx.hvd.allgather(torch.cat(parts), name=name)

    fake, logits, real_f = (gather(feats_fake, "wgan.fid.fake"), gather(logits_fake, "wgan.is"),
                            gather(feats_real, "wgan.fid.real"))
    fid = frechet_distance(fake, real_f)
    is_mean, is_std = inception_score(logits)
    return {"FID": f"{fid:.2f} ({n} samples)", "IS": f"{is_mean:.2f} +- {is_std:.2f}"}


# -- training ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wgan_gp.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("model and data")
    g.add_argument("--data", default="digits",
                   help="digits: scikit-learn's 8x8 handwritten digits (real images that ship "
                        "offline, examples/digits.py); a directory: the CIFAR-10 "
                        "(cifar-10-batches-py) or CIFAR-100 (cifar-100-python) python batches; "
                        "synthetic: coloured shapes, 32x32")
    g.add_argument("--synthetic-size", type=int, default=10000,
                   help="images in the synthetic set (--data synthetic)")
    g.add_argument("--filters", type=int, default=None,
                   help="channels of every ResNet block (default 32 for digits, 128 for 32x32)")
    g.add_argument("--latent", type=int, default=None,
                   help="dimension of the generator's input (default 32 for digits, 128 for "
                        "32x32)")
    g.add_argument("--gp", type=float, default=10.0, help="gradient penalty weight")
    g.add_argument("--lr-d", type=float, default=None,
                   help=f"critic lr for Adam-type and extragradient (default 1e-3 for digits, "
                        f"{ADAM_LR_D} for 32x32); adaptive qoda: that times sqrt(#critic "
                        f"params), see _common.adaptive_lr")
    g.add_argument("--lr-g", type=float, default=None,
                   help=f"generator lr (default 1e-3 for digits, {ADAM_LR_G} for 32x32; adaptive "
                        f"qoda: that times sqrt(#generator params))")
    g.add_argument("--sample-every", type=int, default=250,
                   help="steps between sample grids (and, for digits, FID-analogue values)")
    g.add_argument("--grid", type=int, default=64, help="images in a sample grid")
    g.add_argument("--fid-samples", type=int, default=None,
                   help="generated images scored at the end (0: skip): digits: the FID "
                        "analogue of examples/digits.py against the 400 held-out digits "
                        "(default 400, as bench/quality_gan.py); 32x32: FID / Inception Score "
                        "(default 5000)")
    g.add_argument("--inception-weights", default=None,
                   help=f"torch-fidelity Inception weights file (default: torch.hub's "
                        f"checkpoints/{INCEPTION_WEIGHTS}); never downloaded")
    common.add_common_arguments(parser, steps=2000, batch=64,
                                optimizers=["qoda", "optimistic-adam", "extragradient"],
                                default_optimizer="qoda", log_every=50, save_every=1000)
    return parser


def load_images(args, ctx: common.Context) -> tuple[torch.Tensor, str]:
    """The training images (CPU; uint8, or float in [-1, 1] for the digits) and a description."""
    if args.data == "digits":
        images, _ = digits.load_digits("train")
        return images, (f"scikit-learn's handwritten digits, 8x8 grey, training split "
                        f"({images.shape[0]} images; 400 held out for the FID analogue)")
    if args.data != "synthetic":
        images, _, kind = datasets.load_cifar(args.data, "train")
        return images, f"{kind} train split from {args.data} ({images.shape[0]} images)"
    gen = torch.Generator().manual_seed(args.seed)  # the same set on every rank
    n = args.synthetic_size
    images = torch.cat([datasets.synthetic_images(min(1024, n - i), gen)
                        for i in range(0, n, 1024)])
    return images, (f"SYNTHETIC coloured shapes ({n} images, seed {args.seed}), not CIFAR: "
                    "pass --data DIR for CIFAR-10/100")


class DigitScore:
    """The FID analogue of generated digits (rank 0): ``examples/digits.py``'s classifier
    features of ``n`` images from fixed latents, at the base iterate, against the held-out
    digits; and its floor, the same score of ``n`` real training digits."""

    def __init__(self, n: int, latent: int, seed: int, device: torch.device) -> None:
        self.classifier = digits.digit_classifier()
        self.n = min(n, digits.DIGITS_SPLITS["test"]) if n > 0 else 0
        self.z = torch.randn(max(self.n, 2), latent,
                             generator=torch.Generator().manual_seed(seed + 2)).to(device)
        real, _ = digits.load_digits("train")
        pick = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))
        self.floor = digits.digit_quality(real[pick[:max(self.n, 2)]], self.classifier,
                                          n_real=max(self.n, 2))

    @torch.no_grad()
    def __call__(self, model: "WGAN", optimizer) -> dict:
        model.G.eval()
        with common.at_base_iterates(optimizer):
            fake = model.G(self.z)
        model.G.train()
        return digits.digit_quality(fake, self.classifier, n_real=max(self.n, 2))

    def line(self, q: dict, first: Optional[dict]) -> str:
        start = f"; {first['fid']:.1f} at the start" if first else ""
        return (f"FID analogue {q['fid']:.2f} ({q['n_fake']} generated vs {q['n_real']} held-out "
                f"digits; real training digits score {self.floor['fid']:.2f}{start}), label "
                f"entropy {q['label_entropy']:.2f} of ln 10 = 2.30, {q['coverage'] * 10:.0f}/10 "
                f"digits covered (classifier test accuracy {self.classifier.accuracy:.3f})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    is_digits = args.data == "digits"
    for name, value in DATA_DEFAULTS["digits" if is_digits else "images32"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("filters", "latent", "sample_every", "grid", "synthetic_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gp < 0 or args.fid_samples < 0:
        parser.error(f"--gp and --fid-samples must be >= 0, got {args.gp} and {args.fid_samples}")
    if is_digits and 0 < args.fid_samples < 2:
        parser.error(f"--fid-samples must be 0 or >= 2 for digits, got {args.fid_samples}")
    # What the model's shape depends on, checked on resume.
    args.images = "digits 1x8x8" if is_digits else "3x32x32"

    ctx = common.setup(args)
    images, description = load_images(args, ctx)
    torch.manual_seed(args.seed)  # same initial players on every rank
    side, channels = (8, 1) if is_digits else (32, 3)
    model = WGAN(args.filters, args.latent, side, channels).to(ctx.device)
    g_params, d_params = list(model.G.parameters()), list(model.D.parameters())
    spec = common.OPTIMIZERS[args.optimizer]
    adaptive = spec.adaptive(args)
    lr_d = common.adaptive_lr(args.lr_d, d_params) if adaptive else args.lr_d
    lr_g = common.adaptive_lr(args.lr_g, g_params) if adaptive else args.lr_g
    groups = [{"params": d_params, "lr": lr_d}, {"params": g_params, "lr": lr_g}]
    # One optimizer over the stacked field of both players: one exchange per iteration.
    optimizer = common.make_distributed_optimizer(groups, model.named_parameters(), args,
                                                  types=model)
    run = common.Run("wgan_gp", args, ctx,
                     ["loss_d", "loss_g", "wasserstein", "gradient_penalty"]
                     + (["fid_analogue"] if is_digits else []),
                     model_options=["images", "filters", "latent"])
    if run.checkpoint is not None:
        model.load_state_dict(run.checkpoint["model"])
        optimizer.load_state_dict(run.checkpoint["optimizer"])
    else:
        ctx.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    ctx.print(f"wgan_gp: data: {description}")
    ctx.print(f"wgan_gp: G {sum(p.numel() for p in g_params)} params, D "
              f"{sum(p.numel() for p in d_params)} params, {args.optimizer} lr D {lr_d:.3g} "
              f"G {lr_g:.3g}, {ctx.size} ranks x batch {args.batch} on {ctx.device}")

    # Digits: rank 0 scores the generator (FID analogue) at the start, every --sample-every
    # steps and at the end; the classifier is trained once per machine and cached.
    score = first = None
    fid = math.nan
    if is_digits and ctx.main and args.fid_samples > 0:
        score = DigitScore(args.fid_samples, args.latent, args.seed, ctx.device)
        if run.checkpoint is None:
            first = score(model, optimizer)
            fid = first["fid"]
            ctx.print(f"wgan_gp: at the start: {score.line(first, None)}")

    fixed_z = torch.randn(args.grid, args.latent,
                          generator=torch.Generator().manual_seed(args.seed + 1)).to(ctx.device)
    columns = int(math.ceil(math.sqrt(args.grid)))

    def write_samples(step: int) -> None:
        if args.out is None or not ctx.main:
            return
        model.G.eval()
        with torch.no_grad(), common.at_base_iterates(optimizer):
            fake = model.G(fixed_z)
        model.G.train()
        grid = (digits.digit_grid(fake, columns=columns, scale=4) if is_digits
                else common.image_grid(fake, columns=columns))
        common.write_png(os.path.join(args.out, f"samples_{step:07d}.png"), grid)

    step, calls = run.start_step, [0]

    def field() -> dict[str, float]:
        """Both players' gradients at the current point: p.grad = (grad_G L_G, grad_D L_D)."""
        gen = common.step_generator(args.seed, ctx.rank, step, stream=calls[0])
        calls[0] += 1
        real = datasets.sample_images(images, args.batch, gen, ctx.device)
        z = torch.randn(args.batch, args.latent, generator=gen).to(ctx.device)
        fake = model.G(z)
        scores = model.D(torch.cat([real, fake]))
        d_real, d_fake = scores[:args.batch].mean(), scores[args.batch:].mean()
        penalty = gradient_penalty(model.D, real, fake, gen)
        loss_d = d_fake - d_real + args.gp * penalty
        loss_g = -d_fake
        loss_d.backward(inputs=d_params, retain_graph=True)
        loss_g.backward(inputs=g_params)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "wasserstein": (d_real - d_fake).item(), "gradient_penalty": penalty.item()}

    bar = run.steps()
    for step in bar:
        calls[0] = 0
        values = common.run_iteration(optimizer, field)
        if score is not None and run.due(step, args.sample_every):
            fid = score(model, optimizer)["fid"]
        if run.due(step, args.log_every):
            values = ctx.means(values, "wgan.metrics")
            if is_digits:
                values["fid_analogue"] = fid  # rank 0's score (others log no file)
            run.log(step, optimizer, values)
            bar.set_postfix(W=f"{values['wasserstein']:.3g}", gp=f"{values['gradient_penalty']:.3g}",
                            **({"fid": f"{fid:.1f}"} if score is not None else {}), refresh=False)
        if run.due(step, args.sample_every):
            write_samples(step)
        if run.due(step, args.save_every):
            run.save(step, optimizer, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    bar.close()
    if is_digits:
        extra = {}
        if score is not None:
            final = score(model, optimizer)
            ctx.print(f"wgan_gp: at step {args.steps}: {score.line(final, first)}")
            extra = {"FID analogue": f"{final['fid']:.2f}"}
        elif args.fid_samples == 0:
            extra = {"FID analogue": "skipped (--fid-samples 0)"}
    else:
        with common.at_base_iterates(optimizer):
            extra = compute_metrics(ctx, args, model, images)
    run.finish(optimizer, extra)
    ctx.hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(common.exit_on_error(main))
