"""examples/data.py: CIFAR batches in the real pickle format, WikiText raw text, synthetic sets."""
from __future__ import annotations

import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


data = _load("data")


def write_batch(path, images: np.ndarray, labels, label_key=b"labels"):
    """A batch file as the official archive has it: a pickled dict with bytes keys."""
    batch = {b"batch_label": b"testing batch 1 of 1", label_key: list(labels),
             b"data": images.reshape(len(images), -1),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [lab // 5 for lab in labels]
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_cifar10_batch_layout_and_split(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [random_images(3, i) for i in range(6)]
    for i in range(5):
        write_batch(root / f"data_batch_{i + 1}", batches[i], [i, (i + 1) % 10, 9])
    write_batch(root / "test_batch", batches[5], [7, 7, 7])

    images, labels = data.read_cifar_batch(str(root / "data_batch_1"))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    # Row of 3072 bytes = the R plane, then G, then B, each 32x32 row major.
    flat = batches[0].reshape(3, -1)
    assert images[1, 0, 2, 5] == flat[1, 2 * 32 + 5]
    assert images[1, 1, 0, 0] == flat[1, 1024] and images[1, 2, 31, 31] == flat[1, 3071]
    assert labels.tolist() == [0, 1, 9]

    # The parent directory works too; train concatenates the five batches in order.
    train, train_labels, kind = data.load_cifar(str(tmp_path), "train")
    assert kind == "cifar10" and train.shape == (15, 3, 32, 32)
    assert torch.equal(train[12:], torch.from_numpy(batches[4]))
    assert train_labels[:3].tolist() == [0, 1, 9]
    test, test_labels, _ = data.load_cifar(str(root), "test")
    assert test.shape[0] == 3 and test_labels.tolist() == [7, 7, 7]


def test_cifar100_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    write_batch(root / "train", random_images(4, 0), [99, 0, 42, 5], b"fine_labels")
    write_batch(root / "test", random_images(2, 1), [1, 2], b"fine_labels")
    images, labels, kind = data.load_cifar(str(root))
    assert kind == "cifar100" and images.shape == (4, 3, 32, 32)
    assert labels.tolist() == [99, 0, 42, 5]


@pytest.mark.parametrize("batch, match", [
    ({b"labels": [0]}, "b'data'"),
    ({b"data": np.zeros((1, 3072), np.uint8)}, "labels"),
    ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, r"\[N, 3072\]"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ([1, 2, 3], "not a dict"),
])
def test_cifar_bad_batches_name_the_problem(tmp_path, batch, match):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=match):
        data.read_cifar_batch(str(path))


def test_cifar_missing_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.load_cifar(str(tmp_path))


WIKI_TRAIN = (" \n = Valkyria Chronicles = \n \n Senjou no Valkyria 3 : <unk> Chronicles , "
              "the game . \n \n = = Gameplay = = \n the game is a game . \n")
WIKI_VALID = " \n = Robert = \n the <unk> game . \n"


def write_wikitext(tmp_path):
    root = tmp_path / "wikitext-103-raw"
    root.mkdir()
    (root / "wiki.train.raw").write_text(WIKI_TRAIN, encoding="utf-8")
    (root / "wiki.valid.raw").write_text(WIKI_VALID, encoding="utf-8")
    return root


def test_wikitext_files_found_from_dir_parent_or_file(tmp_path):
    root = write_wikitext(tmp_path)
    train = str(root / "wiki.train.raw")
    assert data.find_wikitext(str(root)) == train
    assert data.find_wikitext(str(tmp_path)) == train
    assert data.find_wikitext(train, "valid") == str(root / "wiki.valid.raw")
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        data.find_wikitext(str(root), "test")
    assert data.read_text(train) == WIKI_TRAIN
    assert data.read_text(train, max_chars=10) == WIKI_TRAIN[:10]


def test_word_vocabulary_wikitext_conventions(tmp_path):
    text = data.read_text(data.find_wikitext(str(write_wikitext(tmp_path))))
    vocab = data.build_vocabulary(text, "word")
    assert vocab.tokens[:2] == ("<unk>", "<eos>")
    assert vocab.tokens.count("<unk>") == 1  # WikiText's own <unk> merges with ours
    words = [w for line in text.splitlines() for w in line.split()]
    lines = [line for line in text.splitlines() if line.split()]
    ids = vocab.encode(text)
    assert ids.dtype == torch.int32 and ids.numel() == len(words) + len(lines)
    assert (ids == vocab.tokens.index("<eos>")).sum() == len(lines)
    # Most frequent word first after the reserved tokens ("=" occurs 8 times).
    assert vocab.tokens[2] == "="
    assert vocab.decode(vocab.encode(" the game . \n").tolist()) == "the game .\n"
    # A capped vocabulary sends the rest to <unk> (id 0); unseen words too.
    small = data.build_vocabulary(text, "word", max_size=4)
    assert len(small) == 4 and (small.encode("Senjou Robert\n")[:2] == 0).all()


def test_char_vocabulary_round_trip():
    text = "héllo wörld\n = x = \n"
    vocab = data.build_vocabulary(text, "char")
    ids = vocab.encode(text)
    assert ids.numel() == len(text) and vocab.decode(ids.tolist()) == text
    assert vocab.encode("z").tolist() == [0]  # unseen character -> <unk>


def test_random_windows_are_shifted_targets():
    tokens = torch.arange(50, dtype=torch.int32)
    x, y = data.random_windows(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    with pytest.raises(ValueError, match="seq-len"):
        data.random_windows(tokens, 1, 60, torch.Generator())


def test_synthetic_sets_are_deterministic_and_shaped():
    a = data.synthetic_images(5, torch.Generator().manual_seed(3))
    b = data.synthetic_images(5, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert a.float().std() > 10  # shapes on a background, not a flat image
    x = data.sample_images(a, 8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    text = data.synthetic_text(50, torch.Generator().manual_seed(0))
    assert text == data.synthetic_text(50, torch.Generator().manual_seed(0))
    assert text.count(" .") == 50 and " = " in text
    assert len(data.build_vocabulary(text, "word")) < 60  # a small grammar: learnable


def test_stdlib_split_by_file_is_deterministic_and_disjoint():
    root, files = data.stdlib_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    held = [f for f in files if data.is_validation(f.relative_to(root).as_posix())]
    assert 0.05 < len(held) / len(files) < 0.15  # about a tenth of the files
    train, valid, desc = data.load_stdlib_bytes(200_000, 50_000)
    assert train.dtype == torch.uint8 and train.numel() >= 200_000 and valid.numel() >= 50_000
    again = data.load_stdlib_bytes(200_000, 50_000)
    assert torch.equal(train, again[0]) and torch.equal(valid, again[1]) and desc == again[2]
    # Files in sorted order, each followed by a newline; the held-out ones only in validation.
    first_valid = held[0].read_bytes() + b"\n"
    assert bytes(valid[:len(first_valid)].tolist()) == first_valid
    first_train = next(f for f in files if f not in held).read_bytes() + b"\n"
    assert bytes(train[:len(first_train)].tolist()) == first_train
    text_train, text_valid, text_desc = data.read_stdlib_text(200_000, 50_000)
    assert text_desc == desc
    assert text_train == bytes(train.tolist()).decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match="max_train and max_valid"):
        data.load_stdlib_bytes(0, 10)


def test_sample_images_takes_float_images_as_they_are():
    images = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8)
    x = data.sample_images(images, 16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert all(any(torch.equal(row, im) for im in images) for row in x)  # drawn, not rescaled
