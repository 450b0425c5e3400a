"""Distributed monotone games (bilinear / quadratic min-max) solved with compressed exchange.

Every rank holds the same game (:mod:`qoda_hvd.problems`) and its own noisy oracle: rank ``k``
draws its noise from its own ``torch.Generator`` (seeded by seed, rank and step), writes the
operator ``A(z) + noise`` into ``z.grad`` with ``game.write_grad``, and
:func:`qoda_hvd.DistributedOptimizer` averages the K oracles through the compressed exchange.
Reports the distance to the solution and the restricted gap over the steps, and the number of
exchanges: one per iteration for QODA and optimistic SGD, two for extra-gradient.

The point ``z`` is one 1-D tensor, which the default typing would send uncompressed (1-D
tensors are biases and gains in a network); here it is typed ``"game"`` by an override, so it
is quantized and coded like a layer.

Launch (2 local ranks)::

    horovodrun -np 2 -H localhost:2 python examples/vi_games.py --optimizer qoda
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

GAMES = ("bilinear", "quadratic")
NOISES = ("absolute", "relative", "none")
#: Layer typing of the game's point: one compressed type (overrides beat the size rule).
GAME_TYPES = {"z": "game"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vi_games.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("game")
    g.add_argument("--game", choices=GAMES, default="bilinear",
                   help="bilinear: min_x max_y x'Ay (+ mu/2 regularisation); quadratic: "
                        "mu-strongly monotone min-max with random P, B, Q")
    g.add_argument("--dim", type=int, default=512,
                   help="n = dimension of x and of y; the point z = (x, y) has 2n coordinates")
    g.add_argument("--mu", type=float, default=0.0,
                   help="strong monotonicity (bilinear: regularisation, 0 = pure bilinear; "
                        "quadratic: must be > 0, 0 means 0.1)")
    g.add_argument("--condition", type=float, default=4.0,
                   help="bilinear: singular values of A spread over [1/condition, 1]")
    g.add_argument("--noise", choices=NOISES, default="relative",
                   help="oracle noise: absolute (sigma N(0, I)), relative (sigma ||A(z)|| "
                        "N(0, I/d)), none")
    g.add_argument("--sigma", type=float, default=0.5, help="noise level of --noise")
    g.add_argument("--lr", type=float, default=None,
                   help="step size (default: with an adaptive --step-size (qoda's default) "
                        "sqrt(2n), the expected distance of the random start from the solution, "
                        "since the adaptive lr is a length in z-space; else 0.5)")
    g.add_argument("--radius", type=float, default=1.0,
                   help="radius of the restricted gap around the solution")
    common.add_common_arguments(parser, steps=300, batch=None,
                                optimizers=["qoda", "extragradient", "optimistic-sgd"],
                                default_optimizer="qoda", log_every=25)
    return parser


def make_game(args: argparse.Namespace):
    from qoda_hvd.problems import BilinearGame, QuadraticGame, make_noise

    gen = torch.Generator().manual_seed(args.seed)  # the same game on every rank
    noise = make_noise(args.noise, args.sigma)
    if args.game == "bilinear":
        return BilinearGame.random(args.dim, mu=args.mu, generator=gen, noise=noise,
                                   condition=args.condition)
    return QuadraticGame.random(args.dim, mu=args.mu or 0.1, generator=gen, noise=noise)


def evaluation_point(optimizer, game) -> torch.Tensor:
    """The base iterate x_t (QODA and optimistic optimizers hold the extrapolated half-iterate
    in the parameter; extra-gradient holds x_t after its step)."""
    base = getattr(optimizer, "base_iterates", None)
    if base is not None:
        iterates = base()
        if iterates:
            return iterates[0]
    return game.z.detach()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    if args.dim < 1:
        parser.error(f"--dim must be >= 1, got {args.dim}")
    if args.sigma < 0:
        parser.error(f"--sigma must be >= 0, got {args.sigma}")
    if args.radius <= 0:
        parser.error(f"--radius must be > 0, got {args.radius}")

    ctx = common.setup(args)
    game = make_game(args).to(ctx.device)
    if args.lr is not None:
        lr = args.lr
    elif common.OPTIMIZERS[args.optimizer].adaptive(args):
        # The start is z* + N(0, I_d): ||z_1 - z*|| ~ sqrt(d), the length dual averaging wants.
        lr = math.sqrt(game.dim)
    else:
        lr = 0.5  # below 1/L: the coupling's largest singular value is 1
    optimizer = common.make_distributed_optimizer([{"params": [game.z], "lr": lr}],
                                                  game.named_parameters(), args, GAME_TYPES)
    run = common.Run("vi_games", args, ctx, ["distance", "gap", "oracle_norm"],
                     model_options=["game", "dim", "mu", "condition", "seed"])
    if run.checkpoint is not None:
        game.load_state_dict(run.checkpoint["game"])
        optimizer.load_state_dict(run.checkpoint["optimizer"])
    ctx.print(f"vi_games: {args.game} game, d = {game.dim}, {args.noise} noise sigma "
              f"{args.sigma}, {args.optimizer} lr {lr}, {ctx.size} ranks on {ctx.device}")
    start_distance = game.distance_to_solution(evaluation_point(optimizer, game))

    step = run.start_step
    calls = [0]

    def field() -> float:
        # This rank's oracle; extra-gradient calls it twice per step (two streams).
        gen = common.step_generator(args.seed, ctx.rank, step, stream=calls[0])
        calls[0] += 1
        grad = game.write_grad(gen)
        return float(grad.norm())

    distance = gap = math.nan
    bar = run.steps()
    for step in bar:
        calls[0] = 0
        oracle_norm = common.run_iteration(optimizer, field)
        if run.due(step, args.log_every):
            point = evaluation_point(optimizer, game)
            distance = game.distance_to_solution(point)
            # Identical on every rank; the gap (an eigendecomposition) only where it is written.
            gap = game.gap(point, radius=args.radius) if ctx.main else math.nan
            run.log(step, optimizer, {"distance": distance, "gap": gap,
                                      "oracle_norm": ctx.mean(oracle_norm, "vi.oracle_norm")})
            bar.set_postfix(distance=f"{distance:.3g}", gap=f"{gap:.3g}", refresh=False)
        if run.due(step, args.save_every):
            run.save(step, optimizer, {"game": game.state_dict(), "optimizer": optimizer.state_dict()})
    bar.close()
    point = evaluation_point(optimizer, game)
    distance = game.distance_to_solution(point)
    gap = game.gap(point, radius=args.radius) if ctx.main else math.nan
    run.finish(optimizer, {"distance": f"{distance:.4g} (start {start_distance:.4g})",
                           "gap": f"{gap:.4g}"})
    ctx.hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(common.exit_on_error(main))
