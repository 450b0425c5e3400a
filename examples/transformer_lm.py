"""A small decoder-only transformer language model with layer-wise compressed gradient exchange.

Token and position embeddings (``nn.Embedding``), pre-norm ``nn.TransformerEncoderLayer``
blocks under a causal mask, a final LayerNorm and a separate ``lm_head`` Linear. The layer types
of the compression come from the module classes (``Compression.layerwise(types=model)``):
embeddings -> ``embedding``, everything inside ``nn.MultiheadAttention`` -> ``attention``, the
blocks' ``linear1``/``linear2`` -> ``feedforward``, ``lm_head`` -> ``output``; small and 1-D
tensors (biases, norms) travel uncompressed. Each type gets its own adapted levels.

Data: ``--data`` is WikiText-103 raw (``wiki.train.raw``, or the directory holding it; the
validation split ``wiki.valid.raw`` is used when present, else the last 5% of the training
tokens), tokenised at word (default) or character level with a vocabulary built from the
training text. Without ``--data`` a SYNTHETIC text from a small grammar is used and announced.
Each rank samples its own random windows. Reports training loss, validation perplexity, and
per layer type the number of levels and bits per symbol; bits per coordinate overall.

Launch (2 local ranks)::

    horovodrun -np 2 -H localhost:2 python examples/transformer_lm.py --data /data/wikitext-103-raw --out runs/lm
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

#: Adam learning rate the defaults start from (adaptive QODA: times sqrt(#params)).
ADAM_LR = 1e-3


class TransformerLM(nn.Module):
    """Decoder-only transformer: embeddings, causal pre-norm blocks, LayerNorm, ``lm_head``.

    Example::

        >>> m = TransformerLM(vocab=50, d_model=32, heads=2, layers=2, d_ff=64, max_len=16)
        >>> m(torch.zeros(3, 16, dtype=torch.long)).shape
        torch.Size([3, 16, 50])
    """

    def __init__(self, vocab: int, d_model: int = 256, heads: int = 4, layers: int = 4,
                 d_ff: int = 1024, max_len: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        h = self.embed(idx) + self.pos_embed(torch.arange(length, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=idx.device)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.lm_head(self.norm(h))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformer_lm.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("model and data")
    g.add_argument("--data", default=None,
                   help="WikiText-103 raw: wiki.train.raw or its directory; default: SYNTHETIC "
                        "text from a small grammar")
    g.add_argument("--tokenizer", choices=datasets.TOKENIZER_LEVELS, default="word",
                   help="word: whitespace tokens + <eos> per line (WikiText style); char: "
                        "characters")
    g.add_argument("--vocab-size", type=int, default=32768,
                   help="most frequent tokens kept (rarer ones become <unk>)")
    g.add_argument("--max-chars", type=int, default=None,
                   help="read at most this many characters of each split (default: all)")
    g.add_argument("--synthetic-sentences", type=int, default=20000,
                   help="sentences of synthetic training text (when --data is not given)")
    g.add_argument("--d-model", type=int, default=256, help="width of the model")
    g.add_argument("--heads", type=int, default=4, help="attention heads (divide --d-model)")
    g.add_argument("--layers", type=int, default=4, help="transformer blocks")
    g.add_argument("--d-ff", type=int, default=1024, help="hidden width of the feed-forward")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the blocks")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {ADAM_LR} for adam / optimistic-adam; adaptive "
                        "qoda: that times sqrt(#params), see _common.adaptive_lr)")
    g.add_argument("--eval-every", type=int, default=500,
                   help="steps between validation perplexities (and one at the end)")
    g.add_argument("--eval-batches", type=int, default=8,
                   help="validation batches per rank per evaluation")
    common.add_common_arguments(parser, steps=5000, batch=32,
                                optimizers=["qoda", "optimistic-adam", "adam"],
                                default_optimizer="qoda", log_every=50, save_every=500)
    return parser


def load_corpus(args) -> tuple[str, str, str]:
    """``(train_text, valid_text, description)``; ``valid_text`` may be empty (then the tail
    of the training tokens is held out)."""
    if args.data is not None:
        train_path = datasets.find_wikitext(args.data, "train")
        train = datasets.read_text(train_path, args.max_chars)
        try:
            valid = datasets.read_text(datasets.find_wikitext(args.data, "valid"), args.max_chars)
            where = "wiki.valid.raw"
        except FileNotFoundError:
            valid, where = "", "the last 5% of the training tokens"
        return train, valid, f"{train_path} ({len(train)} chars; validation: {where})"
    gen = torch.Generator().manual_seed(args.seed)
    train = datasets.synthetic_text(args.synthetic_sentences, gen)
    valid = datasets.synthetic_text(max(args.synthetic_sentences // 20, 1), gen)
    return train, valid, (f"SYNTHETIC grammar text ({args.synthetic_sentences} sentences, seed "
                          f"{args.seed}), not WikiText: pass --data for WikiText-103")


def type_report(model: nn.Module, optimizer) -> str:
    """Per layer type: parameters, levels, and bits per symbol before entropy coding."""
    from qoda_hvd.quant import classify_parameters

    types = optimizer.compression_stats().get("types")
    if not types:
        return "no layer types (compression is not layerwise)"
    typing = classify_parameters(model)
    numels = dict(zip(typing.type_names, typing.type_numels()))
    parts = [f"{name} {numels.get(name, 0)} params {levels} levels "
             f"{1 + math.ceil(math.log2(levels))} bits/symbol" for name, levels in types.items()]
    raw = sum(typing.numels[n] for n in typing.uncompressed)
    return "; ".join(parts) + f"; uncompressed {raw} params"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_common_arguments(parser, args)
    for name in ("d_model", "heads", "layers", "d_ff", "seq_len", "eval_every", "eval_batches",
                 "synthetic_sentences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.heads:
        parser.error(f"--heads must divide --d-model, got {args.heads} and {args.d_model}")
    if args.vocab_size < 3:
        parser.error(f"--vocab-size must be >= 3, got {args.vocab_size}")

    ctx = common.setup(args)
    train_text, valid_text, description = load_corpus(args)
    vocab = datasets.build_vocabulary(train_text, args.tokenizer, args.vocab_size)
    train = vocab.encode(train_text)
    valid = vocab.encode(valid_text) if valid_text else torch.zeros(0, dtype=torch.int32)
    if valid.numel() < args.seq_len + 2:
        cut = int(train.numel() * 0.95)
        train, valid = train[:cut], train[cut:]
    del train_text, valid_text

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = TransformerLM(len(vocab), args.d_model, args.heads, args.layers, args.d_ff,
                          args.seq_len, args.dropout).to(ctx.device)
    params = list(model.parameters())
    lr = args.lr if args.lr is not None else (
        common.adaptive_lr(ADAM_LR, params) if common.OPTIMIZERS[args.optimizer].adaptive(args)
        else ADAM_LR)
    optimizer = common.make_distributed_optimizer([{"params": params, "lr": lr}],
                                                  model.named_parameters(), args, types=model)
    run = common.Run("transformer_lm", args, ctx, ["loss", "val_perplexity"],
                     model_options=["tokenizer", "vocab_size", "d_model", "heads", "layers",
                                    "d_ff", "seq_len"])
    if run.checkpoint is not None:
        if list(run.checkpoint["vocab"]) != list(vocab.tokens):
            raise SystemExit("--resume: the vocabulary built from this --data differs from the "
                             "checkpoint's: resume with the same corpus and --max-chars")
        model.load_state_dict(run.checkpoint["model"])
        optimizer.load_state_dict(run.checkpoint["optimizer"])
    else:
        ctx.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    ctx.print(f"transformer_lm: data: {description}")
    ctx.print(f"transformer_lm: {args.tokenizer} vocabulary {len(vocab)}, {train.numel()} "
              f"training / {valid.numel()} validation tokens, {sum(p.numel() for p in params)} "
              f"params, {args.optimizer} lr {lr:.3g}, {ctx.size} ranks x batch {args.batch} on "
              f"{ctx.device}")

    def perplexity() -> float:
        """Validation perplexity at the base iterate; each rank its own windows, averaged."""
        gen = common.step_generator(args.seed, ctx.rank, common.EVALUATION_STEP)  # same windows each time
        model.eval()
        total = 0.0
        with torch.no_grad(), common.at_base_iterates(optimizer):
            for _ in range(args.eval_batches):
                x, y = datasets.random_windows(valid, args.batch, args.seq_len, gen, ctx.device)
                total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.train()
        return math.exp(ctx.mean(total / args.eval_batches, "lm.val_loss"))

    step = run.start_step

    def field() -> dict[str, float]:
        gen = common.step_generator(args.seed, ctx.rank, step)
        x, y = datasets.random_windows(train, args.batch, args.seq_len, gen, ctx.device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return {"loss": loss.item()}

    val_ppl = math.nan
    bar = run.steps()
    for step in bar:
        values = common.run_iteration(optimizer, field)
        if run.due(step, args.eval_every):
            val_ppl = perplexity()
        if run.due(step, args.log_every):
            values = ctx.means(values, "lm.metrics")
            run.log(step, optimizer, dict(values, val_perplexity=val_ppl))
            bar.set_postfix(loss=f"{values['loss']:.3f}", ppl=f"{val_ppl:.1f}", refresh=False)
        if run.due(step, args.save_every):
            run.save(step, optimizer, {"model": model.state_dict(),
                                       "optimizer": optimizer.state_dict(),
                                       "vocab": list(vocab.tokens)})
    bar.close()
    if run.start_step >= args.steps:
        val_ppl = perplexity()
    ctx.print(f"transformer_lm: layer types: {type_report(model, optimizer)}")
    run.finish(optimizer, {"val perplexity": f"{val_ppl:.2f}"})
    ctx.hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(common.exit_on_error(main))
