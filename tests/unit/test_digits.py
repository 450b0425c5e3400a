"""examples/digits.py: the bundled digits split, the cached classifier, the Frechet distance."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


digits = _load("digits")

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="scikit-learn is not installed (the `examples` extra; "
           "`make setup` installs it): the digits ship inside its wheel")

#: A quick recipe for the cache tests (seconds); the default recipe is the one benches use.
TINY = digits.ClassifierRecipe(epochs=2, batch=128)


# -- Frechet distance (no scikit-learn needed) --------------------------------------------

def gaussian(n, dim, seed, scale=1.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_identical_sets_give_zero():
    a = gaussian(500, 16, 0)
    assert abs(digits.frechet_distance(a, a)) < 1e-9
    assert abs(digits.frechet_distance(a.float(), a.float().clone())) < 1e-6


def test_shift_and_scale_match_the_closed_form_exactly():
    # b = s a + c has sample mean s mu_a + c and covariance s^2 S_a, so the closed form is
    # ||(1 - s) mu_a - c||^2 + tr(S_a) (1 - s)^2, for the sample statistics themselves.
    a = gaussian(400, 8, 1) @ gaussian(8, 8, 2) + 0.3  # correlated features
    shift = torch.linspace(-1, 2, 8, dtype=torch.float64)
    sa = torch.cov(a.T)
    assert digits.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    s = 2.5
    expected = float(((1 - s) * a.mean(0) - shift).square().sum() + sa.trace() * (1 - s) ** 2)
    assert digits.frechet_distance(a, s * a + shift) == pytest.approx(expected, rel=1e-9)


def test_independent_gaussians_match_the_population_closed_form():
    # N(mu1, D1) vs N(mu2, D2), diagonal: ||mu1 - mu2||^2 + sum (sqrt d1 - sqrt d2)^2.
    d1 = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=torch.float64)
    d2 = torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    mu = torch.tensor([1.0, 0.0, -0.5, 0.25], dtype=torch.float64)
    a = gaussian(200_000, 4, 3) * d1.sqrt()
    b = gaussian(200_000, 4, 4) * d2.sqrt() + mu
    expected = float(mu @ mu + (d1.sqrt() - d2.sqrt()).square().sum())
    assert digits.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_agrees_with_scipy_sqrtm_and_is_symmetric():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a = gaussian(300, 10, 5) @ gaussian(10, 10, 6)
    b = gaussian(250, 10, 7) @ gaussian(10, 10, 8) + 1.0
    sa, sb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    cross = scipy_linalg.sqrtm(sa @ sb).real.trace()
    diff = (a.mean(0) - b.mean(0)).numpy()
    expected = float(diff @ diff + sa.trace() + sb.trace() - 2 * cross)
    assert digits.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert digits.frechet_distance(b, a) == pytest.approx(expected, rel=1e-7)


def test_singular_covariances_stay_finite_and_non_negative():
    a = torch.zeros(50, 6, dtype=torch.float64)
    a[:, 0] = gaussian(50, 1, 9)[:, 0]  # rank-1 covariance
    b = torch.zeros(50, 6, dtype=torch.float64)
    value = digits.frechet_distance(a, b)
    assert math.isfinite(value) and value >= 0


@pytest.mark.parametrize("a, b, words", [
    (torch.zeros(5, 3), torch.zeros(5, 4), "same number of features"),
    (torch.zeros(1, 3), torch.zeros(5, 3), "feats_a"),
    (torch.zeros(5), torch.zeros(5, 1), "feats_a"),
    (torch.zeros(5, 2), torch.full((5, 2), float("nan")), "feats_b holds non-finite"),
])
def test_bad_features_are_refused(a, b, words):
    with pytest.raises(ValueError, match=words):
        digits.frechet_distance(a, b)


# -- data ----------------------------------------------------------------------------------

def test_a_bad_split_is_named():
    with pytest.raises(ValueError, match="split must be one of 'train', 'test', got 'valid'"):
        digits.load_digits("valid")


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match="scikit-learn.*extra"):
        digits.load_digits("train")


@needs_sklearn
def test_split_is_fixed_stratified_and_disjoint():
    train, train_y = digits.load_digits("train")
    test, test_y = digits.load_digits("test")
    assert train.shape == (1397, 1, 8, 8) and test.shape == (400, 1, 8, 8)
    assert train.dtype == torch.float32 and train_y.dtype == torch.int64
    assert float(train.min()) == -1.0 and float(train.max()) == 1.0
    assert test_y.bincount().tolist() == [40] * 10
    flat = {tuple(r) for r in train.flatten(1).tolist()}
    overlap = sum(tuple(r) in flat for r in test.flatten(1).tolist())
    assert overlap <= 2  # the raw set has a couple of duplicate images, not shared indices
    again, _ = digits.load_digits("test")
    assert torch.equal(test, again)


# -- classifier cache ----------------------------------------------------------------------

@needs_sklearn
def test_classifier_is_cached_and_a_changed_recipe_misses(tmp_path, monkeypatch):
    first = digits.digit_classifier(str(tmp_path), TINY)
    assert not first.from_cache and os.path.isfile(first.path)
    assert 0.5 < first.accuracy <= 1.0  # two epochs already learn most digits

    trained = []
    real_train = digits._train
    monkeypatch.setattr(digits, "_train", lambda *a: (trained.append(1), real_train(*a)))
    second = digits.digit_classifier(str(tmp_path), TINY)
    assert second.from_cache and not trained and second.path == first.path
    assert second.accuracy == first.accuracy
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)

    other = digits.digit_classifier(str(tmp_path), digits.ClassifierRecipe(epochs=2, batch=128, seed=1))
    assert trained == [1] and not other.from_cache and other.path != first.path


@needs_sklearn
def test_training_is_deterministic_and_a_broken_cache_file_retrains(tmp_path):
    a = digits.digit_classifier(str(tmp_path / "a"), TINY)
    with open(a.path, "wb") as f:
        f.write(b"not a checkpoint")
    b = digits.digit_classifier(str(tmp_path / "a"), TINY)
    assert not b.from_cache and b.accuracy == a.accuracy
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@needs_sklearn
def test_quality_separates_real_digits_from_noise_and_collapse(tmp_path):
    net = digits.digit_classifier(str(tmp_path), TINY)
    train, labels = digits.load_digits("train")
    real = digits.digit_quality(train[:400], net)
    noise = digits.digit_quality(torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, net)
    collapsed = digits.digit_quality(train[labels == 3][:100], net, n_real=200)
    assert set(real) >= {"fid", "label_entropy", "coverage", "n_fake", "n_real"}
    assert real["n_fake"] == 400 and real["n_real"] == 400 and collapsed["n_real"] == 200
    assert real["coverage"] == 1.0 and real["label_entropy"] > 0.95 * math.log(10)
    assert real["fid"] < noise["fid"] / 5 and real["fid"] < collapsed["fid"] / 5
    assert collapsed["coverage"] <= 0.2 and collapsed["label_entropy"] < 0.5
    with pytest.raises(ValueError, match="fake_images"):
        digits.digit_quality(torch.zeros(4, 3, 8, 8), net)
    with pytest.raises(ValueError, match="n_real"):
        digits.digit_quality(train[:10], net, n_real=401)


def test_grid_shape():
    grid = digits.digit_grid(torch.zeros(12, 1, 8, 8), columns=5, scale=2, pad=1)
    assert grid.shape == (1 + 3 * 17, 1 + 5 * 17, 3) and grid.dtype.name == "uint8"
