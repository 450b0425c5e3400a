"""Real images that need no download, and an FID analogue on them: scikit-learn's digits.

One concept: the quality of generated 8x8 handwritten digits, measured against real ones.

- :func:`load_digits`: the 1,797 8x8 grey images of handwritten digits that ship inside the
  scikit-learn wheel (``sklearn.datasets.load_digits`` reads a file of the package; nothing is
  downloaded), scaled to [-1, 1], split deterministically into 1,397 training and 400 test
  images (40 of each digit held out).
- :func:`digit_classifier`: a small conv net trained once on the training split (fixed seed,
  one thread, so every machine trains the same weights) and cached on disk under a key made of
  the data, the architecture and the recipe; its test accuracy is reported.
- :func:`frechet_distance` and :func:`digit_quality`: the Frechet distance between Gaussians
  fitted to the classifier's penultimate features of generated and held-out real images, plus
  the classifier's label entropy and its coverage of the 10 digits.

.. note::
    This is an FID *analogue*: the features are those of a 64-feature classifier trained on
    these digits, not Inception-v3's 2048 pool features on 299x299 images, so the numbers are
    comparable only with each other (same classifier, same sample sizes), never with published
    FIDs. Frechet distances are biased upwards at small sample sizes; compare runs at equal
    ``n_fake`` and ``n_real``.

Needs scikit-learn (the optional extra of the examples and benchmarks); importing this module
does not, only loading the data does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassifierRecipe",
    "DigitClassifier",
    "DIGITS_SPLITS",
    "digit_classifier",
    "digit_grid",
    "digit_quality",
    "frechet_distance",
    "load_digits",
]

#: Splits of :func:`load_digits` and their sizes.
DIGITS_SPLITS = {"train": 1397, "test": 400}
#: Test images per digit (40 x 10 = 400).
_TEST_PER_CLASS = 40
#: Seed of the fixed train/test split (changing it changes every cached classifier's key).
_SPLIT_SEED = 20260
#: Bumped when the cache file's layout changes.
_CACHE_FORMAT = 1
_EXTRA_HINT = ("scikit-learn is needed for the digits data (it ships them inside its wheel): "
               "install the examples extra (`pip install qoda_hvd[examples]`; `make setup` "
               "installs it) or `pip install scikit-learn`")


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError(_EXTRA_HINT) from e
    return sk_load_digits()


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits, one split.

    The split is fixed and stratified: 40 images of each digit, chosen by a seeded permutation,
    form ``"test"`` (400 images); the other 1,397 form ``"train"``. Pixel values 0..16 are
    mapped to [-1, 1] (``v / 8 - 1``).

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 8, 8)`` in [-1, 1] and int64 ``(N,)``.

    Raises:
        ValueError: ``split`` is neither.
        ImportError: scikit-learn is not installed (the message names the extra).

    Example::

        >>> images, labels = load_digits("test")
        >>> images.shape, labels.bincount().tolist() == [40] * 10
        (torch.Size([400, 1, 8, 8]), True)
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, DIGITS_SPLITS))}, got {split!r}")
    bunch = _sklearn_digits()
    data = np.asarray(bunch.images, dtype=np.float32)
    target = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.RandomState(_SPLIT_SEED).permutation(target.size)
    test = np.zeros(target.size, dtype=bool)
    for digit in range(10):
        test[order[target[order] == digit][:_TEST_PER_CLASS]] = True
    keep = np.sort(np.flatnonzero(test if split == "test" else ~test))
    images = torch.from_numpy(data[keep] / 8.0 - 1.0).unsqueeze(1).contiguous()
    return images, torch.from_numpy(target[keep])


# -- classifier ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassifierRecipe:
    """How :func:`digit_classifier` trains (part of the cache key).

    Attributes:
        seed: initial weights and batch order.
        epochs: passes over the training split.
        batch: images per step.
        lr: Adam's learning rate.
        weight_decay: Adam's L2 weight decay.
    """

    seed: int = 0
    epochs: int = 40
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("epochs", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")


class DigitClassifier(nn.Module):
    """Conv net for 8x8 digits: two 3x3 convs (16, 32 channels), 2x2 max pool, a 64-unit
    hidden layer (the features of :func:`digit_quality`), 10 logits.

    Attributes:
        accuracy: fraction of the test split classified correctly (set by
            :func:`digit_classifier`; NaN for an untrained net).
        from_cache: whether :func:`digit_classifier` loaded the weights instead of training.
        path: the cache file.

    Example::

        >>> net = DigitClassifier()
        >>> net.features(torch.zeros(2, 1, 8, 8)).shape, net(torch.zeros(2, 1, 8, 8)).shape
        (torch.Size([2, 64]), torch.Size([2, 10]))
    """

    #: Part of the cache key: change it with any change of the layers below.
    ARCHITECTURE = "conv3x3(1,16)-relu-conv3x3(16,32)-relu-maxpool2-fc(512,64)-relu-fc(64,10)"
    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, self.FEATURES)
        self.head = nn.Linear(self.FEATURES, 10)
        self.accuracy = float("nan")
        self.from_cache = False
        self.path: Optional[str] = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, 64)`` of images ``(N, 1, 8, 8)`` in [-1, 1]."""
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on every machine, whatever its cores
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qoda_hvd")


def _cache_key(images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe) -> str:
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(json.dumps({"format": _CACHE_FORMAT, "architecture": DigitClassifier.ARCHITECTURE,
                         "recipe": asdict(recipe), "split_seed": _SPLIT_SEED},
                        sort_keys=True).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def _accuracy(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net(images).argmax(1) == labels).double().mean())


def _train(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor,
           recipe: ClassifierRecipe) -> None:
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(images.shape[0], generator=gen)
        for lo in range(0, order.numel(), recipe.batch):
            idx = order[lo:lo + recipe.batch]
            opt.zero_grad()
            F.cross_entropy(net(images[idx]), labels[idx]).backward()
            opt.step()
    net.eval()


def digit_classifier(cache_dir: Optional[str] = None,
                     recipe: Optional[ClassifierRecipe] = None) -> DigitClassifier:
    """The digits classifier: loaded from the cache, or trained once and cached.

    Training is deterministic (``recipe.seed``, one thread, CPU): a few seconds. The cache file
    ``digit_classifier-<key>.pt`` is keyed by a hash of the training split, the architecture
    and the recipe, so a change of any of them trains anew; it is written atomically (two
    processes training at once leave one valid file).

    Args:
        cache_dir: where the weights are kept (default ``~/.cache/qoda_hvd``, or
            ``$XDG_CACHE_HOME/qoda_hvd``).
        recipe: how to train (default :class:`ClassifierRecipe`'s).

    Returns:
        The classifier in eval mode, on the CPU, with ``.accuracy`` on the test split,
        ``.from_cache`` and ``.path``.

    Example::

        >>> net = digit_classifier()  # doctest: +SKIP
        >>> net.accuracy > 0.95  # doctest: +SKIP
        True
    """
    recipe = ClassifierRecipe() if recipe is None else recipe
    if not isinstance(recipe, ClassifierRecipe):
        raise TypeError(f"recipe must be a ClassifierRecipe, got {type(recipe).__name__}")
    images, labels = load_digits("train")
    directory = _default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.path.join(directory, f"digit_classifier-{_cache_key(images, labels, recipe)}.pt")
    net = DigitClassifier()
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(saved["state_dict"])
            net.eval()
            net.accuracy, net.from_cache, net.path = float(saved["accuracy"]), True, path
            return net
        except Exception:  # a truncated or foreign file: train again and overwrite it
            net = DigitClassifier()
    with _one_thread():
        torch.manual_seed(recipe.seed)
        net = DigitClassifier()
        _train(net, images, labels, recipe)
        test_images, test_labels = load_digits("test")
        net.accuracy = _accuracy(net, test_images, test_labels)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"state_dict": net.state_dict(), "accuracy": net.accuracy,
                "recipe": asdict(recipe), "architecture": DigitClassifier.ARCHITECTURE}, tmp)
    os.replace(tmp, path)
    net.path = path
    return net


# -- quality -------------------------------------------------------------------------------

def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, F)``.

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` with unbiased sample
    covariances, in float64. The matrix square root is never formed from the non-symmetric
    ``S_a S_b`` (whose ``scipy.linalg.sqrtm`` can turn complex or lose accuracy on singular
    covariances): ``tr((S_a S_b)^(1/2))`` equals the sum of the square roots of the eigenvalues
    of the symmetric PSD ``S_a^(1/2) S_b S_a^(1/2)``, from two symmetric eigendecompositions,
    with round-off negatives clipped to zero.

    Args:
        feats_a, feats_b: ``(N_a, F)`` and ``(N_b, F)`` finite features, ``N >= 2``.

    Returns:
        The distance (>= 0 up to round-off; ~0 for identical sets).

    Example::

        >>> a = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_distance(a, a), 6), round(frechet_distance(a, a + 2.0), 6)
        (0.0, 12.0)
    """
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be a 2-D tensor (N, F) with N >= 2, got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{name} holds non-finite values")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same number of features, got "
                         f"{feats_a.shape[1]} and {feats_b.shape[1]}")
    a, b = feats_a.detach().double().cpu(), feats_b.detach().double().cpu()
    diff = a.mean(0) - b.mean(0)
    sa, sb = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    evals, evecs = torch.linalg.eigh(sa)
    root_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = root_a @ sb @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    return float(diff @ diff + sa.trace() + sb.trace() - 2.0 * cross)


_REAL_FEATURES: dict = {}


@torch.no_grad()
def _features(net: DigitClassifier, images: torch.Tensor, chunk: int = 1024):
    feats, probs = [], []
    for lo in range(0, images.shape[0], chunk):
        f = net.features(images[lo:lo + chunk])
        feats.append(f.double())
        probs.append(torch.softmax(net.head(f).double(), dim=1))
    return torch.cat(feats), torch.cat(probs)


def digit_quality(fake_images: torch.Tensor, classifier: Optional[DigitClassifier] = None,
                  n_real: int = DIGITS_SPLITS["test"], coverage_share: float = 0.025) -> dict:
    """FID analogue, label entropy and digit coverage of generated 8x8 digits.

    FID analogue: the Frechet distance (:func:`frechet_distance`) between the classifier's
    64 penultimate features of ``fake_images`` and of the first ``n_real`` held-out real images
    (the test split, never seen by the classifier or a GAN trained on ``"train"``). Not
    Inception-FID: comparable only between runs scored with the same classifier and the same
    ``n_fake`` and ``n_real`` (Frechet distances shrink as the samples grow).

    Args:
        fake_images: ``(N, 1, 8, 8)`` in [-1, 1] (clamped), ``N >= 2``.
        classifier: a :class:`DigitClassifier` (default: :func:`digit_classifier`'s, cached).
        n_real: held-out real images, in [2, 400].
        coverage_share: a digit counts as covered when at least this share of the generated
            images is classified as it (default 2.5%, a quarter of the uniform 10%).

    Returns:
        ``{"fid", "label_entropy", "coverage", "confidence", "class_shares", "n_fake",
        "n_real", "classifier_accuracy"}``: ``label_entropy`` is the entropy (nats) of the
        predicted-label histogram (``ln 10 = 2.303`` when every digit is equally frequent, 0
        when one digit only), ``coverage`` the fraction of the 10 digits covered,
        ``confidence`` the mean top softmax probability, ``class_shares`` the histogram.

    Example::

        >>> real, _ = load_digits("train")  # doctest: +SKIP
        >>> q = digit_quality(real[:400])  # doctest: +SKIP
        >>> q["coverage"], q["fid"] < 5  # doctest: +SKIP
        (1.0, True)
    """
    if (not isinstance(fake_images, torch.Tensor) or fake_images.dim() != 4
            or tuple(fake_images.shape[1:]) != (1, 8, 8) or fake_images.shape[0] < 2):
        raise ValueError(f"fake_images must be a tensor (N, 1, 8, 8) with N >= 2, got "
                         f"{tuple(fake_images.shape) if isinstance(fake_images, torch.Tensor) else type(fake_images).__name__}")
    if isinstance(n_real, bool) or not isinstance(n_real, int) or not 2 <= n_real <= DIGITS_SPLITS["test"]:
        raise ValueError(f"n_real must be an int in [2, {DIGITS_SPLITS['test']}], got {n_real!r}")
    if not 0 < coverage_share <= 0.1:
        raise ValueError(f"coverage_share must be in (0, 0.1], got {coverage_share!r}")
    net = digit_classifier() if classifier is None else classifier
    key = (id(net), net.path, n_real)
    with _one_thread():
        if key not in _REAL_FEATURES:
            real, _ = load_digits("test")
            # Stratified prefix: the test split is sorted by index, so take a seeded subset.
            order = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))
            _REAL_FEATURES[key] = _features(net, real[order[:n_real]])[0]
        real_feats = _REAL_FEATURES[key]
        fake = fake_images.detach().float().cpu().clamp(-1, 1)
        fake_feats, probs = _features(net, fake)
    shares = torch.bincount(probs.argmax(1), minlength=10).double() / fake.shape[0]
    nonzero = shares[shares > 0]
    return {"fid": frechet_distance(fake_feats, real_feats),
            "label_entropy": float(-(nonzero * nonzero.log()).sum()) + 0.0,  # no -0.0
            "coverage": float((shares >= coverage_share).double().mean()),
            "confidence": float(probs.max(1).values.mean()),
            "class_shares": [round(float(s), 4) for s in shares],
            "n_fake": int(fake.shape[0]), "n_real": int(n_real),
            "classifier_accuracy": float(net.accuracy)}


def digit_grid(images: torch.Tensor, columns: int = 10, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile ``(N, 1, 8, 8)`` digits in [-1, 1] into one uint8 RGB image ``(H, W, 3)``, each pixel
    repeated ``scale`` times (8x8 is too small to see), for a PNG writer.

    Example::

        >>> digit_grid(torch.zeros(12, 1, 8, 8), columns=5, scale=2, pad=1).shape
        (52, 86, 3)
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
    if columns < 1 or scale < 1 or pad < 0:
        raise ValueError(f"columns and scale must be >= 1 and pad >= 0, got {columns}, {scale}, {pad}")
    n, _, h, w = images.shape
    big = images.detach().float().cpu().clamp(-1, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    rows, cols = math.ceil(n / columns), min(n, columns)
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad)), 64, dtype=np.uint8)
    pixels = ((big[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[i]
    return np.repeat(grid[:, :, None], 3, axis=2)
