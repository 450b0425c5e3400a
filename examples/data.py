"""Datasets of the examples: CIFAR python-pickle batches, WikiText raw text, the Python standard
library's sources, synthetic stand-ins.

One concept: turning files on disk (or a seed) into tensors. Nothing here downloads: point
``--data`` at files you already have, or use what ships with every install (the standard
library's sources here; the handwritten digits of ``digits.py``), or the clearly labelled
synthetic data.

- CIFAR-10 ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) and
  CIFAR-100 ``cifar-100-python/`` (``train``, ``test``): pickled dicts with ``b"data"`` (uint8,
  ``[N, 3072]``, planes R, G, B of 32x32, row major) and ``b"labels"`` (CIFAR-10) or
  ``b"fine_labels"`` (CIFAR-100). No torchvision needed.
- WikiText-103 raw (``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``): plain UTF-8 text;
  tokenised here at character or word level with a vocabulary built from the training text.
- The standard library's ``.py`` files (``sysconfig``'s ``stdlib`` directory, ``site-packages``
  excluded): real text on every machine with Python, split by file into training and
  validation (``crc32(relative path) % 10 == 0`` holds a file out, about 10% of them); as bytes
  (:func:`load_stdlib_bytes`, the quality benchmark's byte-level LM) or text
  (:func:`read_stdlib_text`, the LM example's default).
- Synthetic images (coloured discs and rectangles on a tinted background) and synthetic text
  (sentences from a small random grammar), for runs without data.

.. warning::
    The CIFAR files are Python pickles; unpickling runs code chosen by whoever wrote the file.
    Read only batch files from a source you trust (the official archive).
"""
from __future__ import annotations

import os
import pickle
import sysconfig
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = [
    "CIFAR_SPLITS",
    "TOKENIZER_LEVELS",
    "Vocabulary",
    "build_vocabulary",
    "find_wikitext",
    "is_validation",
    "load_cifar",
    "load_stdlib_bytes",
    "random_windows",
    "read_cifar_batch",
    "read_stdlib_text",
    "read_text",
    "sample_images",
    "stdlib_files",
    "synthetic_images",
    "synthetic_text",
]

CIFAR_SIDE = 32
CIFAR_ROW = 3 * CIFAR_SIDE * CIFAR_SIDE  # 3072 bytes per image
#: Files of each split, for CIFAR-10 and CIFAR-100.
CIFAR_SPLITS = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
_CIFAR_SUBDIRS = ("cifar-10-batches-py", "cifar-100-python")
#: Tokenizer levels of :func:`build_vocabulary`.
TOKENIZER_LEVELS = ("char", "word")
UNK, EOS = "<unk>", "<eos>"


# -- CIFAR ---------------------------------------------------------------------------------

def read_cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR python batch file.

    Args:
        path: a ``data_batch_*`` / ``test_batch`` (CIFAR-10) or ``train`` / ``test``
            (CIFAR-100) file.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]`` (fine labels for
        CIFAR-100).

    Raises:
        ValueError: the file is not a CIFAR batch (missing keys, wrong dtype or shape).

    Example::

        >>> images, labels = read_cifar_batch("cifar-10-batches-py/data_batch_1")  # doctest: +SKIP
        >>> images.shape  # doctest: +SKIP
        torch.Size([10000, 3, 32, 32])
    """
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as e:  # pickle raises many types on foreign bytes
            raise ValueError(f"{path} is not a CIFAR python batch file: {e}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR python batch file: it holds a "
                         f"{type(batch).__name__}, not a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = None
    for key in (b"labels", b"fine_labels", "labels", "fine_labels"):
        if key in batch:
            labels = batch[key]
            break
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR python batch file: it needs b'data' and "
                         f"b'labels' (or b'fine_labels'), found keys {sorted(map(str, batch))}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW:
        raise ValueError(f"{path}: b'data' must be uint8 of shape [N, {CIFAR_ROW}], got "
                         f"{data.dtype} {list(data.shape)}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    images = torch.from_numpy(data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).copy())
    return images, torch.from_numpy(labels)


def _cifar_dir(root: str) -> tuple[str, str]:
    """``(directory, "cifar10" | "cifar100")`` for ``root`` or its standard subdirectory."""
    for directory in [root] + [os.path.join(root, s) for s in _CIFAR_SUBDIRS]:
        for kind, splits in CIFAR_SPLITS.items():
            if all(os.path.isfile(os.path.join(directory, f)) for f in splits["train"]):
                return directory, kind
    raise FileNotFoundError(
        f"no CIFAR python batches under {root!r}: expected data_batch_1..data_batch_5 "
        "(CIFAR-10, cifar-10-batches-py/) or train (CIFAR-100, cifar-100-python/); "
        "download and extract the python version of the archive first")


def load_cifar(root: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Load a CIFAR-10 or CIFAR-100 split from the extracted python-pickle batches.

    Args:
        root: the extracted directory (``cifar-10-batches-py`` / ``cifar-100-python``) or
            its parent.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels, kind)``: uint8 ``[N, 3, 32, 32]``, int64 ``[N]``, and
        ``"cifar10"`` or ``"cifar100"``.

    Example::

        >>> images, labels, kind = load_cifar("/data/cifar-10-batches-py")  # doctest: +SKIP
        >>> kind, images.shape[0]  # doctest: +SKIP
        ('cifar10', 50000)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory, kind = _cifar_dir(root)
    parts = [read_cifar_batch(os.path.join(directory, f)) for f in CIFAR_SPLITS[kind][split]]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return images, labels, kind


def synthetic_images(n: int, generator: torch.Generator, side: int = 32) -> torch.Tensor:
    """``n`` synthetic RGB images: one coloured disc and one coloured rectangle on a tinted
    background, at random places and sizes (a labelled stand-in for CIFAR, not a benchmark).

    Args:
        n: number of images, >= 1.
        generator: the only source of randomness.
        side: image side in pixels.

    Returns:
        uint8 ``[n, 3, side, side]``.

    Example::

        >>> synthetic_images(4, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 32, 32])
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")

    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    yy, xx = coords.view(1, side, 1), coords.view(1, 1, side)
    background = uniform(n, 3, 1, 1, lo=0.0, hi=0.4)
    centre = uniform(n, 2, lo=0.2, hi=0.8)
    radius = uniform(n, lo=0.1, hi=0.3)
    disc = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
            <= radius[:, None, None] ** 2)
    corner = uniform(n, 2, lo=0.0, hi=0.6)
    size = uniform(n, 2, lo=0.15, hi=0.4)
    rect = ((yy >= corner[:, 0, None, None]) & (yy < (corner[:, 0] + size[:, 0])[:, None, None])
            & (xx >= corner[:, 1, None, None]) & (xx < (corner[:, 1] + size[:, 1])[:, None, None]))
    image = background.expand(n, 3, side, side).clone()
    image = torch.where(rect[:, None], uniform(n, 3, 1, 1, lo=0.5, hi=1.0), image)
    image = torch.where(disc[:, None], uniform(n, 3, 1, 1, lo=0.3, hi=1.0), image)
    return (image * 255.0).round().clamp_(0, 255).to(torch.uint8)


def sample_images(images: torch.Tensor, batch: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A minibatch drawn uniformly with replacement, as float in [-1, 1] on ``device``, from
    uint8 images (0..255) or float images already in [-1, 1] (the digits of ``digits.py``).

    Example::

        >>> imgs = synthetic_images(8, torch.Generator().manual_seed(0))
        >>> x = sample_images(imgs, 4, torch.Generator().manual_seed(1))
        >>> x.shape, bool(x.min() >= -1 and x.max() <= 1)
        (torch.Size([4, 3, 32, 32]), True)
    """
    idx = torch.randint(images.shape[0], (batch,), generator=generator)
    if images.dtype.is_floating_point:
        return images[idx].to(device=device, dtype=torch.float32)
    return images[idx].to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)


# -- text ----------------------------------------------------------------------------------

def find_wikitext(path: str, split: str = "train") -> str:
    """The file of ``split`` for ``--data``: a ``wiki.<split>.raw`` file itself, or a directory
    holding it (``wikitext-103-raw/``, or its parent).

    Example::

        >>> find_wikitext("/data/wikitext-103-raw", "valid")  # doctest: +SKIP
        '/data/wikitext-103-raw/wiki.valid.raw'
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be one of train, valid, test, got {split!r}")
    name = f"wiki.{split}.raw"
    if os.path.isfile(path):
        if split == "train":
            return path
        sibling = os.path.join(os.path.dirname(path), name)
        if os.path.isfile(sibling):
            return sibling
        raise FileNotFoundError(f"no {name} next to {path}")
    for directory in (path, os.path.join(path, "wikitext-103-raw"), os.path.join(path, "wikitext-2-raw")):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no {name} in {path!r} (nor in its wikitext-103-raw/): give the "
                            "file or the directory of the extracted raw WikiText archive")


def read_text(path: str, max_chars: Optional[int] = None) -> str:
    """UTF-8 text of ``path``, at most ``max_chars`` characters (the whole file by default).

    Example::

        >>> read_text("wiki.valid.raw", max_chars=100)  # doctest: +SKIP
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    with open(path, encoding="utf-8") as f:
        return f.read() if max_chars is None else f.read(max_chars)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files (no ``site-packages``), sorted: ``(root, files)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(f.parts))
    return root, files


def is_validation(relative: str) -> bool:
    """Held-out files: ``crc32(relative path) % 10 == 0`` (stable across machines).

    Example::

        >>> is_validation("json/__init__.py") in (True, False)
        True
    """
    return zlib.crc32(relative.encode()) % 10 == 0


def _stdlib_split(max_train: int, max_valid: int) -> tuple[dict, str]:
    """Files' bytes (each followed by a newline) by split, in sorted order, until each split
    holds at least its cap; and a description of what was read."""
    if max_train < 1 or max_valid < 1:
        raise ValueError(f"max_train and max_valid must be >= 1, got {max_train}, {max_valid}")
    root, files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: this Python ships without its "
                                "standard library's sources; pass --data")
    parts: dict = {True: [], False: []}
    sizes = {True: 0, False: 0}
    caps = {True: max_valid, False: max_train}
    for f in files:
        held = is_validation(f.relative_to(root).as_posix())
        if sizes[held] >= caps[held]:
            continue
        data = f.read_bytes() + b"\n"
        parts[held].append(data)
        sizes[held] += len(data)
    desc = (f"{root} (.py, site-packages excluded): {len(parts[False])} training files "
            f"({sizes[False]:,} bytes), {len(parts[True])} validation files ({sizes[True]:,} "
            f"bytes), split by crc32(path) % 10 == 0")
    return parts, desc


def load_stdlib_bytes(max_train: int, max_valid: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The standard library's sources as bytes: ``(train, valid, description)``, uint8 tensors
    of the files concatenated in sorted order, each split read until it holds at least its cap.

    Example::

        >>> train, valid, _ = load_stdlib_bytes(10_000, 1_000)
        >>> train.dtype, train.numel() >= 10_000, valid.numel() >= 1_000
        (torch.uint8, True, True)
    """
    parts, desc = _stdlib_split(max_train, max_valid)
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(parts[False]), as_tensor(parts[True]), desc


def read_stdlib_text(max_train: int, max_valid: int) -> tuple[str, str, str]:
    """The standard library's sources as text: ``(train, valid, description)``, the files of
    :func:`load_stdlib_bytes` decoded as UTF-8 (the odd undecodable byte replaced).

    Example::

        >>> train, valid, desc = read_stdlib_text(10_000, 1_000)
        >>> "def " in train, "validation files" in desc
        (True, True)
    """
    parts, desc = _stdlib_split(max_train, max_valid)
    text = {k: b"".join(v).decode("utf-8", errors="replace") for k, v in parts.items()}
    return text[False], text[True], desc


@dataclass(frozen=True)
class Vocabulary:
    """A character- or word-level vocabulary; id 0 is ``<unk>``.

    Word level follows the WikiText convention: tokens are whitespace-separated and every line
    ends with ``<eos>`` (blank lines are skipped). Unknown tokens map to ``<unk>`` (WikiText's
    own rare-word token is ``<unk>`` as well, so they merge).

    Attributes:
        level: ``"char"`` or ``"word"``.
        tokens: token of each id.
    """

    level: str
    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.level not in TOKENIZER_LEVELS:
            raise ValueError(f"level must be one of {TOKENIZER_LEVELS}, got {self.level!r}")
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"tokens must start with {UNK!r}")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as int32 (4 bytes a token: WikiText-103 has ~10^8 of them).

        Example::

            >>> v = build_vocabulary("ab ab\\n", "word")
            >>> v.tokens, v.encode("ab cd\\n").tolist()
            (('<unk>', '<eos>', 'ab'), [2, 0, 1])
        """
        index = {t: i for i, t in enumerate(self.tokens)}
        if self.level == "char":
            # One table lookup over the code points, no Python loop over characters.
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            if codes.size == 0:
                return torch.zeros(0, dtype=torch.int32)
            table = np.zeros(int(codes.max()) + 1, dtype=np.int32)
            for t, i in index.items():
                if t != UNK and ord(t) < table.size:
                    table[ord(t)] = i
            return torch.from_numpy(table[codes])
        ids = array("i")  # compact; a list of Python ints would take ~7x the memory
        eos = index[EOS]
        for line in text.splitlines():
            words = line.split()
            if words:
                ids.extend(index.get(w, 0) for w in words)
                ids.append(eos)
        return torch.from_numpy(np.frombuffer(ids, dtype=np.int32).copy())

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (words joined by spaces, ``<eos>`` as a newline)."""
        toks = [self.tokens[int(i)] for i in ids]
        if self.level == "char":
            return "".join(toks)
        lines, line = [], []
        for t in toks:
            if t == EOS:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(t)
        return "".join(lines) + " ".join(line)


def build_vocabulary(text: str, level: str = "char", max_size: Optional[int] = None) -> Vocabulary:
    """Vocabulary of ``text``: tokens by decreasing count (ties by the token), ``<unk>`` first.

    Deterministic, so every rank builds the same ids from the same text.

    Args:
        text: the training text.
        level: ``"char"`` or ``"word"``.
        max_size: keep at most this many tokens, ``<unk>`` (and ``<eos>``) included.

    Example::

        >>> build_vocabulary("abca", "char").tokens
        ('<unk>', 'a', 'b', 'c')
    """
    if level not in TOKENIZER_LEVELS:
        raise ValueError(f"level must be one of {TOKENIZER_LEVELS}, got {level!r}")
    if max_size is not None and max_size < 3:
        raise ValueError(f"max_size must be >= 3 or None, got {max_size}")
    if level == "char":
        counts = Counter(text)
        reserved = [UNK]
    else:
        counts = Counter(w for line in text.splitlines() for w in line.split())
        counts.pop(UNK, None)
        reserved = [UNK, EOS]
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    keep = None if max_size is None else max_size - len(reserved)
    return Vocabulary(level, tuple(reserved + [t for t, _ in ranked[:keep]]))


_SUBJECTS = ("the model", "a worker", "the critic", "every rank", "the optimizer", "our network",
             "a gradient", "the cluster")
_VERBS = ("sends", "quantizes", "averages", "encodes", "receives", "compresses", "updates",
          "learns")
_OBJECTS = ("the levels", "a payload", "its gradient", "the dual vector", "every layer",
            "the embedding", "a few bits", "the attention weights")
_ENDINGS = ("quickly", "once per step", "with entropy coding", "over the network", "in parallel",
            "without bias")


def synthetic_text(n_sentences: int, generator: torch.Generator) -> str:
    """Synthetic text (a labelled stand-in for WikiText): sentences ``subject verb object
    [ending] .`` from a small vocabulary, one paragraph of 1-6 sentences per line, with
    WikiText-like `` = Title = `` heading lines. Learnable structure, so perplexity falls.

    Example::

        >>> synthetic_text(3, torch.Generator().manual_seed(0)).count(" .")
        3
    """
    if not isinstance(n_sentences, int) or n_sentences < 1:
        raise ValueError(f"n_sentences must be an integer >= 1, got {n_sentences!r}")
    pick = torch.randint(0, 1 << 30, (n_sentences, 5), generator=generator).tolist()
    lines, line, left = [], [], 0
    for s, v, o, e, p in pick:
        if left == 0:
            if line:
                lines.append(" " + " ".join(line) + " ")
                line = []
            if p % 5 == 0:
                lines.append(f" = {_SUBJECTS[s % len(_SUBJECTS)].split()[-1].title()} = ")
            left = 1 + p % 6
        words = [_SUBJECTS[s % len(_SUBJECTS)], _VERBS[v % len(_VERBS)], _OBJECTS[o % len(_OBJECTS)]]
        if e % 2:
            words.append(_ENDINGS[(e // 2) % len(_ENDINGS)])
        line.append(" ".join(words) + " .")
        left -= 1
    if line:
        lines.append(" " + " ".join(line) + " ")
    return "\n".join(lines) + "\n"


def random_windows(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``length + 1`` tokens: inputs and next-token targets.

    Example::

        >>> x, y = random_windows(torch.arange(100), 2, 8, torch.Generator().manual_seed(0))
        >>> bool((y == x + 1).all())
        True
    """
    if tokens.numel() < length + 2:
        raise ValueError(f"the corpus has {tokens.numel()} tokens; --seq-len {length} needs at "
                         f"least {length + 2}")
    starts = torch.randint(tokens.numel() - length - 1, (batch,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(length + 1)].to(device=device, dtype=torch.int64)
    return windows[:, :-1], windows[:, 1:]
