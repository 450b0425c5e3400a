"""A small decoder-only transformer language model with layer-wise compressed gradient exchange.

Token and position embeddings (``nn.Embedding``), pre-norm ``nn.TransformerEncoderLayer``
blocks under a causal mask, a final LayerNorm and a separate ``lm_head`` Linear. The layer types
of the compression come from the module classes (``Compression.layerwise(types=model)``):
embeddings -> ``embedding``, everything inside ``nn.MultiheadAttention`` -> ``attention``, the
blocks' ``linear1``/``linear2`` -> ``feedforward``, ``lm_head`` -> ``output``; small and 1-D
tensors (biases, norms) travel uncompressed. Each type gets its own adapted levels.

Data (``--data``):

- ``stdlib`` (default): real text that ships with every Python, the standard library's ``.py``
  sources (``data.read_stdlib_text``: split by file, about 10% of the files held out for
  validation, the split the quality benchmark uses), at character level by default;
- a path: WikiText-103 raw (``wiki.train.raw``, or the directory holding it; the validation
  split ``wiki.valid.raw`` is used when present, else the last 5% of the training tokens), at
  word level by default;
- ``synthetic``: sentences of a small random grammar (a labelled stand-in, for tests).

The vocabulary is built from the training text (``--tokenizer char|word``). Each rank samples its
own random windows. Reports training loss, validation loss and perplexity, per layer type the
number of levels and bits per symbol, bits per coordinate overall, and at the end a few lines the
model writes (``--sample-tokens`` from ``--prompt``, at the base iterate).

Launch (2 local ranks)::

    mpirun -np 2 python examples/transformer_lm.py --out runs/lm
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

#: Default learning rate of adam / optimistic-adam: the quality benchmark's (bench/quality_lm.py).
ADAM_LR = 2e-3
#: Adaptive QODA's default lr is this times sqrt(#params) (_common.adaptive_lr).
QODA_BASE_LR = 1e-3
#: ``--data`` values that are not paths.
BUILTIN_DATA = ("stdlib", "synthetic")
#: Characters of the standard library read for training / validation (``--max-chars`` caps both).
STDLIB_CHARS = (8_000_000, 800_000)


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
    g.add_argument("--data", default="stdlib",
                   help="stdlib: the Python standard library's sources (real text, no "
                        "download); a path: WikiText-103 raw (wiki.train.raw or its directory); "
                        "synthetic: a small random grammar")
    g.add_argument("--tokenizer", choices=datasets.TOKENIZER_LEVELS, default=None,
                   help="word: whitespace tokens + <eos> per line (WikiText style); char: "
                        "characters (default: char for stdlib, word otherwise)")
    g.add_argument("--vocab-size", type=int, default=32768,
                   help="most frequent tokens kept (rarer ones become <unk>)")
    g.add_argument("--max-chars", type=int, default=None,
                   help=f"read at most this many characters of each split (default: all of a "
                        f"WikiText file; stdlib: {STDLIB_CHARS[0]:,} training and "
                        f"{STDLIB_CHARS[1]:,} validation)")
    g.add_argument("--synthetic-sentences", type=int, default=20000,
                   help="sentences of synthetic training text (--data synthetic)")
    # Defaults: the quality benchmark's LM (bench/quality_lm.py), which learns in minutes on 2
    # CPU cores; WikiText-scale runs want more (e.g. --d-model 256 --layers 4 --d-ff 1024
    # --seq-len 128 --batch 32).
    g.add_argument("--d-model", type=int, default=96, help="width of the model")
    g.add_argument("--heads", type=int, default=4, help="attention heads (divide --d-model)")
    g.add_argument("--layers", type=int, default=2, help="transformer blocks")
    g.add_argument("--d-ff", type=int, default=384, help="hidden width of the feed-forward")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per training window")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the blocks")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {ADAM_LR} for adam / optimistic-adam; adaptive "
                        f"qoda: {QODA_BASE_LR} times sqrt(#params), see _common.adaptive_lr)")
    g.add_argument("--eval-every", type=int, default=500,
                   help="steps between validation perplexities (and one at the end)")
    g.add_argument("--eval-batches", type=int, default=8,
                   help="validation batches per rank per evaluation")
    g.add_argument("--prompt", default=None,
                   help="start of the text sampled at the end (default: 'def ' for stdlib, "
                        "'The' otherwise)")
    g.add_argument("--sample-tokens", type=int, default=300,
                   help="tokens sampled after --prompt at the end (0: none)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature of the sample")
    common.add_common_arguments(parser, steps=1000, batch=8,
                                optimizers=["qoda", "optimistic-adam", "adam"],
                                # Adam by default: measured on the standard library at the
                                # default sizes (2 ranks, step 200), validation 2.34 nats/char
                                # with Adam (lr 2e-3), 3.15 with adaptive QODA (lr 1e-3 x
                                # sqrt(#params)), which learns this LM slowly.
                                default_optimizer="adam", log_every=50, save_every=500)
    return parser


def load_corpus(args) -> tuple[str, str, str]:
    """``(train_text, valid_text, description)``; ``valid_text`` may be empty (then the tail
    of the training tokens is held out)."""
    if args.data == "stdlib":
        train, valid, desc = datasets.read_stdlib_text(args.max_chars or STDLIB_CHARS[0],
                                                       args.max_chars or STDLIB_CHARS[1])
        return train, valid, f"the Python standard library's sources: {desc}"
    if args.data != "synthetic":
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


@torch.no_grad()
def sample_text(model: TransformerLM, vocab: datasets.Vocabulary, prompt: str, tokens: int,
                temperature: float, generator: torch.Generator, device: torch.device) -> str:
    """``prompt`` followed by ``tokens`` tokens drawn from the model, one at a time, each
    conditioned on the last ``max_len`` tokens (softmax at ``temperature``).

    Example::

        >>> v = datasets.build_vocabulary("abcabc", "char")
        >>> m = TransformerLM(len(v), d_model=16, heads=2, layers=1, d_ff=32, max_len=8)
        >>> text = sample_text(m, v, "ab", 5, 1.0, torch.Generator().manual_seed(0), "cpu")
        >>> text[:2], len(text)
        ('ab', 7)
    """
    ids = vocab.encode(prompt).tolist()
    if vocab.level == "word" and ids and vocab.tokens[ids[-1]] == datasets.EOS:
        ids = ids[:-1]  # encode ends every line with <eos>; the prompt's line goes on
    ids = ids or [0]
    start = len(ids)
    max_len = model.pos_embed.num_embeddings
    model.eval()
    for _ in range(tokens):
        window = torch.tensor([ids[-max_len:]], device=device)
        logits = model(window)[0, -1].float().cpu() / max(temperature, 1e-6)
        ids.append(int(torch.multinomial(torch.softmax(logits, 0), 1, generator=generator)))
    model.train()
    return prompt + vocab.decode(ids[start:]).replace("<unk>", "?")


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
    if args.max_chars is not None and args.max_chars < 1:
        parser.error(f"--max-chars must be >= 1, got {args.max_chars}")
    if args.sample_tokens < 0 or args.temperature <= 0:
        parser.error(f"--sample-tokens must be >= 0 and --temperature > 0, got "
                     f"{args.sample_tokens} and {args.temperature}")
    if args.tokenizer is None:
        args.tokenizer = "char" if args.data == "stdlib" else "word"
    if args.prompt is None:
        args.prompt = "def " if args.data == "stdlib" else "The"

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
        common.adaptive_lr(QODA_BASE_LR, params) if common.OPTIMIZERS[args.optimizer].adaptive(args)
        else ADAM_LR)
    optimizer = common.make_distributed_optimizer([{"params": params, "lr": lr}],
                                                  model.named_parameters(), args, types=model)
    run = common.Run("transformer_lm", args, ctx, ["loss", "val_loss", "val_perplexity"],
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

    def validation_loss() -> float:
        """Validation loss (nats per token) at the base iterate; each rank its own windows,
        averaged."""
        gen = common.step_generator(args.seed, ctx.rank, common.EVALUATION_STEP)  # same windows each time
        model.eval()
        total = 0.0
        with torch.no_grad(), common.at_base_iterates(optimizer):
            for _ in range(args.eval_batches):
                x, y = datasets.random_windows(valid, args.batch, args.seq_len, gen, ctx.device)
                total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.train()
        return ctx.mean(total / args.eval_batches, "lm.val_loss")

    step = run.start_step

    def field() -> dict[str, float]:
        gen = common.step_generator(args.seed, ctx.rank, step)
        x, y = datasets.random_windows(train, args.batch, args.seq_len, gen, ctx.device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return {"loss": loss.item()}

    val_loss = math.nan
    bar = run.steps()
    for step in bar:
        values = common.run_iteration(optimizer, field)
        if run.due(step, args.eval_every):
            val_loss = validation_loss()
        if run.due(step, args.log_every):
            values = ctx.means(values, "lm.metrics")
            run.log(step, optimizer, dict(values, val_loss=val_loss,
                                          val_perplexity=math.exp(val_loss)))
            bar.set_postfix(loss=f"{values['loss']:.3f}", val=f"{val_loss:.3f}", refresh=False)
        if run.due(step, args.save_every):
            run.save(step, optimizer, {"model": model.state_dict(),
                                       "optimizer": optimizer.state_dict(),
                                       "vocab": list(vocab.tokens)})
    bar.close()
    if run.start_step >= args.steps:
        val_loss = validation_loss()
    ctx.print(f"transformer_lm: layer types: {type_report(model, optimizer)}")
    per = "char" if args.tokenizer == "char" else "token"
    ctx.print(f"transformer_lm: validation loss {val_loss:.4f} nats/{per} "
              f"({val_loss / math.log(2):.3f} bits/{per}, perplexity {math.exp(val_loss):.2f}; "
              f"a uniform guess over the {len(vocab)} tokens: {math.log(len(vocab)):.2f} nats)")
    if ctx.main and args.sample_tokens > 0:
        gen = torch.Generator().manual_seed(args.seed)
        with common.at_base_iterates(optimizer):
            text = sample_text(model, vocab, args.prompt, args.sample_tokens, args.temperature,
                               gen, ctx.device)
        ctx.print(f"transformer_lm: sample ({args.sample_tokens} tokens after {args.prompt!r}, "
                  f"temperature {args.temperature}):\n" + "\n".join(
                      "  | " + line for line in text.splitlines()))
    run.finish(optimizer, {"val loss": f"{val_loss:.4f}",
                           "val perplexity": f"{math.exp(val_loss):.2f}"})
    ctx.hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(common.exit_on_error(main))
