"""The examples' transformer LM trained under PyTorch DDP (``torchrun``) with a qoda_hvd hook.

The same model, data and optimizers as ``transformer_lm.py`` (imported from it, not copied),
but the gradients are averaged by ``torch.nn.parallel.DistributedDataParallel`` and one of its
communication hooks, chosen by ``--hook``:

- ``layerwise`` (default): :func:`qoda_hvd.ddp.layerwise_hook`, layer-wise quantization with
  adapted levels and entropy coding, per DDP bucket;
- ``powersgd``: :func:`qoda_hvd.ddp.powersgd_hook` with per-type ranks (L-GreCo;
  ``--global-rank`` for one rank everywhere);
- ``none`` / ``fp16`` / ``torch-powersgd``: DDP's own float32 allreduce, its fp16 hook, and
  torch's ``powerSGD_hook``, to compare.

Gloo on CPU, NCCL when ``--device cuda``. Launch (2 local ranks)::

    torchrun --nproc-per-node 2 examples/ddp_lm.py --hook layerwise --steps 300
    torchrun --nproc-per-node 2 examples/ddp_lm.py --hook powersgd --rank 4 --data synthetic

``--checkpoint PATH`` saves the model, the optimizer and the hook state at the end (each rank
its own file: the hook state holds this rank's error feedback); ``--resume`` continues from it.
"""
import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
import data as datasets  # noqa: E402
import transformer_lm as lm  # noqa: E402

#: transformer_lm.py's defaults: its corpus options are passed to its load_corpus as they are.
LM_DEFAULTS = vars(lm.build_parser().parse_args([]))

HOOKS = ("layerwise", "powersgd", "none", "fp16", "torch-powersgd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddp_lm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data (as transformer_lm.py)")
    g.add_argument("--data", default=LM_DEFAULTS.get("data"),
                   help="the corpus, as transformer_lm.py's --data")
    g.add_argument("--tokenizer", choices=datasets.TOKENIZER_LEVELS, default="word")
    g.add_argument("--vocab-size", type=int, default=8192)
    g.add_argument("--max-chars", type=int, default=None)
    g.add_argument("--synthetic-sentences", type=int, default=20000)
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--d-ff", type=int, default=512)
    g.add_argument("--seq-len", type=int, default=64)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    t.add_argument("--optimizer", choices=["qoda", "adam"], default="qoda")
    t.add_argument("--step-size", choices=["adaptive", "adaptive_per_tensor", "constant"],
                   default=None, help="QODA's step-size rule (default adaptive)")
    t.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    t.add_argument("--lr", type=float, default=None, help="default: from Adam's 1e-3")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-batches", type=int, default=8)
    h = p.add_argument_group("DDP and its communication hook")
    h.add_argument("--hook", choices=HOOKS, default="layerwise")
    h.add_argument("--bits", type=int, default=4, help="layerwise: bits per symbol")
    h.add_argument("--coding", choices=["auto", "fixed", "rans", "ans", "zstd", "elias"],
                   default="auto", help="layerwise: entropy coder")
    h.add_argument("--bandwidth", type=float, default=None,
                   help="layerwise: link bytes/s for --coding auto (default: measured)")
    h.add_argument("--rank", type=int, default=4, help="PowerSGD rank (the layer-wise budget)")
    h.add_argument("--global-rank", action="store_true",
                   help="powersgd: one rank everywhere instead of per-type ranks")
    h.add_argument("--start-iter", type=int, default=2,
                   help="PowerSGD hooks: plain allreduce for the first steps (torch's needs >= 2)")
    h.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket cap")
    o = p.add_argument_group("outputs")
    o.add_argument("--log-every", type=int, default=20)
    o.add_argument("--checkpoint", default=None,
                   help="save here at the end (a rank suffix is added)")
    o.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    return p


def make_hook(args, model):
    """``(state, hook)`` for ``--hook``; ``(None, None)`` for DDP's own allreduce."""
    import qoda_hvd.ddp as qddp
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

    if args.hook == "layerwise":
        return (qddp.LayerwiseHookState(model=model, bits=args.bits, coding=args.coding,
                                        bandwidth=args.bandwidth), qddp.layerwise_hook)
    if args.hook == "powersgd":
        return (qddp.PowerSGDHookState(model=model, rank=args.rank,
                                       layerwise=not args.global_rank,
                                       start_iter=args.start_iter), qddp.powersgd_hook)
    if args.hook == "fp16":
        return None, default_hooks.fp16_compress_hook
    if args.hook == "torch-powersgd":
        return (torch_psgd.PowerSGDState(None, matrix_approximation_rank=args.rank,
                                         start_powerSGD_iter=max(2, args.start_iter),
                                         orthogonalization_epsilon=1e-8),
                torch_psgd.powerSGD_hook)
    return None, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        parser.error(f"--heads must divide --d-model, got {args.heads} and {args.d_model}")
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint")
    torch.set_num_threads(1)  # ranks share the node's cores
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")

    corpus = argparse.Namespace(**{**LM_DEFAULTS, **vars(args)})
    train_text, valid_text, description = lm.load_corpus(corpus)
    vocab = datasets.build_vocabulary(train_text, args.tokenizer, args.vocab_size)
    train = vocab.encode(train_text)
    valid = vocab.encode(valid_text) if valid_text else torch.zeros(0, dtype=torch.int32)
    if valid.numel() < args.seq_len + 2:
        cut = int(train.numel() * 0.95)
        train, valid = train[:cut], train[cut:]

    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP checks it)
    model = lm.TransformerLM(len(vocab), args.d_model, args.heads, args.layers, args.d_ff,
                          args.seq_len).to(device)
    params = list(model.parameters())
    spec = common.OPTIMIZERS[args.optimizer]
    lr = args.lr if args.lr is not None else (
        common.adaptive_lr(lm.ADAM_LR, params) if spec.adaptive(args) else lm.ADAM_LR)
    optimizer = spec.build([{"params": params, "lr": lr}], args)
    ddp = DDP(model, device_ids=[local] if use_cuda else None,
              bucket_cap_mb=args.bucket_cap_mb, gradient_as_bucket_view=True)
    state, hook = make_hook(args, model)
    start = 0
    path = f"{args.checkpoint}.rank{rank}" if args.checkpoint else None
    if args.resume:
        saved = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["step"]
        if state is not None and saved.get("hook") is not None:
            state = saved["hook"]
            if hasattr(state, "bind"):
                state.bind(model)  # parameters do not travel in a pickle
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    if rank == 0:
        print(f"ddp_lm: data: {description}")
        print(f"ddp_lm: {len(vocab)} tokens vocabulary, {sum(p.numel() for p in params)} params, "
              f"{world} ranks ({dist.get_backend()}) x batch {args.batch}, hook {args.hook}, "
              f"{args.optimizer} lr {lr:.3g}", flush=True)

    def mean(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / world

    def perplexity() -> float:
        gen = common.step_generator(args.seed, rank, common.EVALUATION_STEP)
        model.eval()
        total = 0.0
        with torch.no_grad(), common.at_base_iterates(optimizer):
            for _ in range(args.eval_batches):
                x, y = datasets.random_windows(valid, args.batch, args.seq_len, gen, device)
                total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.train()
        return math.exp(mean(total / args.eval_batches))

    t0, ppl = time.perf_counter(), math.nan
    for step in range(start + 1, args.steps + 1):
        gen = common.step_generator(args.seed, rank, step)
        x, y = datasets.random_windows(train, args.batch, args.seq_len, gen, device)
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        loss.backward()  # DDP's buckets go through the hook as backward makes them
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            ppl = perplexity()
        if step % args.log_every == 0 or step == args.steps:
            lv = mean(loss.item())
            if rank == 0:
                print(f"step {step:5d}  loss {lv:.4f}  val ppl {ppl:.2f}  "
                      f"{(time.perf_counter() - t0) / (step - start):.3f} s/step", flush=True)
    if state is not None and hasattr(state, "compression_stats") and rank == 0:
        stats = state.compression_stats()
        extra = stats.as_dict() if hasattr(stats, "as_dict") else {}
        print(f"ddp_lm: compression {stats[0]:.1f}x ({stats[1]} -> {stats[2]:.0f} float32 "
              f"equivalents)" + (f", {extra['bits_per_coordinate']:.2f} bits/coordinate"
                                 if extra.get("bits_per_coordinate") else "")
              + (f", ranks {extra['ranks']}" if extra.get("ranks") else ""))
    if path:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": args.steps, "hook": state}, path)
    if rank == 0:
        print(f"ddp_lm: done, val perplexity {ppl:.2f}")
    if hasattr(state, "close"):
        state.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
