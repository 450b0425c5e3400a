"""Map parameters to layer types; decide which tensors travel uncompressed; automatic typing.

Default rules (first that applies wins):

1. User ``overrides``: an ordered list of ``(pattern, type_name)``; the first pattern matching the
   parameter name wins. Patterns are :mod:`fnmatch` globs (``"encoder.*.attn.*"``), or regular
   expressions when prefixed with ``"re:"`` (``re.search`` semantics). ``type_name`` may be
   ``"uncompressed"`` or any name (a new type). Overrides beat every rule below, size included.
2. Small tensors: ``dim <= 1`` or ``numel < min_numel`` (default 1024: biases, norms, gains)
   are ``"uncompressed"``.
3. Module class: :class:`torch.nn.Embedding`/``EmbeddingBag`` -> ``"embedding"``;
   :class:`torch.nn.MultiheadAttention` and anything inside it -> ``"attention"``;
   ``nn.ConvNd``/``ConvTransposeNd`` -> ``"convolution"``.
4. Names: a dotted component containing ``attn``/``attention`` or equal to
   ``q_proj, k_proj, v_proj, o_proj, qkv, query, key, value`` -> ``"attention"``; the owning
   module named ``lm_head, head, classifier, fc_out, output_head, out_head, output_layer`` ->
   ``"output"``; a name containing ``embed`` (``wte``, ``wpe``) -> ``"embedding"``.
5. ``output_head="auto"``: when no parameter was named as a head, the last :class:`nn.Linear`
   (registration order) is the ``"output"`` head.
6. Anything else: 3-D+ weights -> ``"convolution"``, others -> ``"feedforward"``.

Type ids are assigned in the canonical order ``embedding, attention, feedforward, convolution,
output`` and then custom names in order of first appearance, keeping only types that occur,
so every rank builds the same ids from the same model.

Automatic typing (:func:`auto_layer_typing`) groups parameters by their histograms of
normalised coordinates instead, choosing the number of types itself (see its docstring).

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 64), nn.Linear(64, 100))
    >>> typing = classify_parameters(model)
    >>> typing.type_name("0.weight"), typing.type_name("1.weight"), typing.type_name("2.weight")
    ('embedding', 'feedforward', 'output')
    >>> "1.bias" in typing.uncompressed
    True
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from qoda_hvd.quant.levels import _LevelProgram, level_candidates, validate_num_levels

__all__ = [
    "UNCOMPRESSED",
    "UNCOMPRESSED_TYPE_ID",
    "CANONICAL_TYPES",
    "LayerTyping",
    "classify_parameters",
    "classify_named_parameters",
    "auto_layer_typing",
]

UNCOMPRESSED = "uncompressed"
UNCOMPRESSED_TYPE_ID = -1
CANONICAL_TYPES = ("embedding", "attention", "feedforward", "convolution", "output")
DEFAULT_MIN_NUMEL = 1024
OUTPUT_HEAD_MODES = ("auto", "names", None)

_ATTN_EXACT = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv", "query", "key", "value"}
_HEAD_NAMES = {"lm_head", "head", "classifier", "fc_out", "output_head", "out_head", "output_layer"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerTyping:
    """The result of typing: parameter name -> type id, type names, the uncompressed set.

    Attributes:
        type_ids: ``{name: type_id}`` for compressed parameters; ids index ``type_names``.
        type_names: name of each type id.
        uncompressed: names of parameters that travel uncompressed.
        numels: ``{name: numel}`` for every parameter (compressed or not).

    Example::

        >>> t = LayerTyping({"w": 0}, ("feedforward",), frozenset({"b"}), {"w": 4096, "b": 64})
        >>> t.type_id("w"), t.type_id("b"), t.num_types
        (0, -1, 1)
    """

    type_ids: Mapping[str, int]
    type_names: tuple[str, ...]
    uncompressed: frozenset[str]
    numels: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, tid in self.type_ids.items():
            if not 0 <= tid < len(self.type_names):
                raise ValueError(f"type id of {name!r} must be in [0, {len(self.type_names) - 1}], got {tid}")
        both = set(self.type_ids) & set(self.uncompressed)
        if both:
            raise ValueError(f"parameters both compressed and uncompressed: {sorted(both)[:5]}")

    @property
    def num_types(self) -> int:
        return len(self.type_names)

    def type_id(self, name: str) -> int:
        """Type id of ``name``, or :data:`UNCOMPRESSED_TYPE_ID` (-1) if it travels uncompressed."""
        if name in self.uncompressed:
            return UNCOMPRESSED_TYPE_ID
        try:
            return self.type_ids[name]
        except KeyError:
            raise KeyError(f"unknown parameter {name!r}; known: {sorted(self.type_ids)[:8]}...") from None

    def type_name(self, name: str) -> str:
        tid = self.type_id(name)
        return UNCOMPRESSED if tid == UNCOMPRESSED_TYPE_ID else self.type_names[tid]

    def names_of(self, type_id: int) -> list[str]:
        """Parameter names of one type, in typing order."""
        return [n for n, t in self.type_ids.items() if t == type_id]

    def type_numels(self) -> list[int]:
        """Total elements per type (needs ``numels``)."""
        out = [0] * self.num_types
        for n, t in self.type_ids.items():
            out[t] += int(self.numels.get(n, 0))
        return out


def _compile_overrides(overrides) -> list[tuple[object, str]]:
    if overrides is None:
        return []
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    compiled = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise TypeError(f"overrides must be (pattern, type_name) string pairs, got {item!r}")
        pattern, tname = item
        if not tname:
            raise ValueError(f"override type name for {pattern!r} must be non-empty")
        if pattern.startswith("re:"):
            try:
                compiled.append((re.compile(pattern[3:]), tname))
            except re.error as e:
                raise ValueError(f"invalid regex override {pattern!r}: {e}") from None
        else:
            compiled.append((pattern, tname))
    return compiled


def _override_for(name: str, compiled) -> Optional[str]:
    for pattern, tname in compiled:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(name, pattern):
                return tname
        elif pattern.search(name):
            return tname
    return None


def _name_rule(name: str) -> Optional[str]:
    parts = name.split(".")
    comps = [c.lower() for c in parts[:-1]]  # module path, without the parameter's own name
    if any("attn" in c or "attention" in c or c in _ATTN_EXACT for c in comps):
        return "attention"
    if comps and comps[-1] in _HEAD_NAMES:
        return "output"
    if any("embed" in c or c in ("wte", "wpe") for c in [x.lower() for x in parts]):
        return "embedding"
    return None


def _assign_ids(assigned: Mapping[str, str]) -> tuple[dict[str, int], tuple[str, ...]]:
    present = []
    for t in CANONICAL_TYPES:
        if t in assigned.values():
            present.append(t)
    for t in assigned.values():
        if t not in present:
            present.append(t)
    index = {t: i for i, t in enumerate(present)}
    return {n: index[t] for n, t in assigned.items()}, tuple(present)


def classify_parameters(
    model: nn.Module,
    *,
    overrides: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    output_head: Optional[str] = "auto",
) -> LayerTyping:
    """Type every named parameter of ``model`` (rules in the module docstring).

    Args:
        model: the module; parameters are taken from ``model.named_parameters()`` (shared
            parameters once, under their first name).
        overrides: ordered ``{pattern: type_name}`` or ``[(pattern, type_name), ...]``.
        min_numel: tensors with fewer elements travel uncompressed; in [0, 2^31].
        output_head: ``"auto"`` (head names, else the last Linear), ``"names"`` (head names
            only) or ``None`` (no output type).

    Example::

        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Flatten(), nn.Linear(64, 10))
        >>> classify_parameters(m, overrides={"2.*": "uncompressed"}).type_names
        ('convolution',)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # Owner module and "inside MultiheadAttention" for each parameter name.
    owner: dict[str, nn.Module] = {}
    in_mha: dict[str, bool] = {}
    mha_prefixes = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for mod_name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            owner[full] = mod
            in_mha[full] = any(full.startswith(p + ".") or p == "" for p in mha_prefixes)
    return _classify(list(model.named_parameters()), owner, in_mha, overrides, min_numel, output_head)


def classify_named_parameters(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    overrides: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    output_head: Optional[str] = "auto",
) -> LayerTyping:
    """Type ``(name, parameter)`` pairs without their modules: the rules of
    :func:`classify_parameters` that need no module class (overrides, size, names, shape; the
    last 2-D ``*weight`` is the output head under ``"auto"``). This is what a Horovod-style
    ``DistributedOptimizer(named_parameters=model.named_parameters())`` has to go on.

    Example::

        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 64), nn.Linear(64, 100))
        >>> t = classify_named_parameters(m.named_parameters(), min_numel=100,
        ...                               overrides={"0.*": "embedding"})
        >>> [t.type_name(n) for n in ("0.weight", "1.weight", "1.bias", "2.weight")]
        ['embedding', 'feedforward', 'uncompressed', 'output']
    """
    named = list(named_parameters)
    if any(not isinstance(p, tuple) or len(p) != 2 for p in named):
        raise TypeError("named_parameters must be (name, tensor) pairs, usually produced by "
                        "model.named_parameters()")
    return _classify(named, {}, {}, overrides, min_numel, output_head)


def _classify(params, owner, in_mha, overrides, min_numel, output_head) -> LayerTyping:
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or not 0 <= min_numel <= 1 << 31:
        raise ValueError(f"min_numel must be an int in [0, {1 << 31}], got {min_numel!r}")
    if output_head not in OUTPUT_HEAD_MODES:
        raise ValueError(f"output_head must be one of {list(OUTPUT_HEAD_MODES)}, got {output_head!r}")
    compiled = _compile_overrides(overrides)
    assigned: dict[str, str] = {}
    uncompressed: set[str] = set()
    numels = {n: p.numel() for n, p in params}
    last_linear = None
    for name, p in params:
        linear = isinstance(owner.get(name), nn.Linear) if owner else p.dim() == 2
        if linear and not in_mha.get(name, False):
            last_linear = name if name.endswith("weight") else last_linear
    head_named = any(_name_rule(n) == "output" for n, _ in params)

    for name, p in params:
        t = _override_for(name, compiled)
        if t is None:
            mod = owner.get(name)
            if p.dim() <= 1 or p.numel() < min_numel:
                t = UNCOMPRESSED
            elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                t = "embedding"
            elif in_mha.get(name, False):
                t = "attention"
            elif isinstance(mod, _CONV):
                t = "convolution"
            else:
                t = _name_rule(name)
                if t == "output" and output_head is None:
                    t = None
                if t is None and output_head == "auto" and not head_named and name == last_linear:
                    t = "output"
                if t is None:
                    t = "convolution" if p.dim() >= 3 else "feedforward"
        if t == UNCOMPRESSED:
            uncompressed.add(name)
        else:
            assigned[name] = t
    ids, names = _assign_ids(assigned)
    return LayerTyping(ids, names, frozenset(uncompressed), numels)


# ----------------------------------------------------------------------------- automatic typing


def _rebin(h: np.ndarray, bins: int) -> np.ndarray:
    if h.shape[-1] == bins:
        return h
    if h.shape[-1] % bins:
        raise ValueError(f"histogram bins ({h.shape[-1]}) must be a multiple of auto_bins ({bins})")
    return h.reshape(*h.shape[:-1], bins, h.shape[-1] // bins).sum(-1)


def _group_costs(hists: np.ndarray, num_levels: int) -> np.ndarray:
    """Total MQV (mass times expected variance at optimal levels) of each histogram row."""
    cand = level_candidates(hists.shape[1], num_levels)
    return np.array([_LevelProgram(h, cand, num_levels).cost_of(num_levels) if h.sum() > 0 else 0.0 for h in hists])


def auto_layer_typing(
    histograms: Mapping[str, torch.Tensor | np.ndarray],
    num_levels: int,
    *,
    uncompressed: Iterable[str] = (),
    numels: Optional[Mapping[str, int]] = None,
    rel_threshold: float = 0.01,
    max_types: int = 8,
    auto_bins: int = 256,
) -> LayerTyping:
    """Group parameters into types by their coordinate statistics, choosing the number of types.

    Each parameter's histogram (counts of normalised coordinates ``|v_i| / ||bucket||`` over
    equal bins of [0, 1], e.g. from :meth:`LayerwiseQuantizer.observe` or
    :func:`~qoda_hvd.quant.adaptive.normalized_histogram`) is rebinned to ``auto_bins``.
    Parameters are ordered by their mean normalised coordinate, and types are contiguous runs of
    that order. Divisive greedy: start from one type; at each round, for every type and every
    split point of its run, compute the MQV of the two halves (each with its own optimal levels;
    pooled histograms add) and apply the split with the largest reduction. Stop when the best
    reduction is below ``rel_threshold`` times the current total MQV, or at ``max_types``.
    Cost: O(P) dynamic programs per round for P parameters, each O(L * auto_bins^2).

    Args:
        histograms: ``{name: histogram}``, equal bin counts (a multiple of ``auto_bins``).
        num_levels: ``L`` the types will be quantized with, in [2, 128].
        uncompressed: names that stay uncompressed (not typed).
        numels: optional element counts, stored in the result.
        rel_threshold: minimum relative MQV gain to add a type, in [0, 1).
        max_types: in [1, 64].
        auto_bins: histogram resolution for the search.

    Returns:
        :class:`LayerTyping` with types named ``"auto0", "auto1", ...`` (increasing mean).

    Example::

        >>> import numpy as np
        >>> h = {"a": np.r_[np.ones(8), np.zeros(248)], "b": np.r_[np.zeros(248), np.ones(8)]}
        >>> auto_layer_typing(h, 4).num_types
        2
    """
    num_levels = validate_num_levels(num_levels)
    if not isinstance(rel_threshold, (int, float)) or not 0.0 <= rel_threshold < 1.0:
        raise ValueError(f"rel_threshold must be in [0, 1), got {rel_threshold}")
    if isinstance(max_types, bool) or not isinstance(max_types, int) or not 1 <= max_types <= 64:
        raise ValueError(f"max_types must be in [1, 64], got {max_types!r}")
    skip = set(uncompressed)
    names = [n for n in histograms if n not in skip]
    if not names:
        return LayerTyping({}, (), frozenset(skip), dict(numels or {}))
    rows = []
    for n in names:
        h = histograms[n]
        h = h.detach().to("cpu", torch.float64).numpy() if isinstance(h, torch.Tensor) else np.asarray(h, np.float64)
        rows.append(h)
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
        raise ValueError("all histograms must be 1-D with the same number of bins")
    hist = _rebin(np.stack(rows), auto_bins)
    mass = hist.sum(1)
    centres = (np.arange(auto_bins) + 0.5) / auto_bins
    mean = np.where(mass > 0, hist @ centres / np.maximum(mass, 1e-300), 0.0)
    order = np.argsort(mean, kind="stable")
    hist = hist[order]

    def best_split(lo: int, hi: int) -> tuple[float, int]:
        """(gain, split) for the run order[lo:hi]; split s means [lo, s) and [s, hi)."""
        if hi - lo < 2:
            return 0.0, -1
        csum = np.cumsum(hist[lo:hi], axis=0)
        total = csum[-1]
        left = csum[:-1]
        right = total[None, :] - left
        whole = _group_costs(total[None, :], num_levels)[0]
        costs = _group_costs(left, num_levels) + _group_costs(right, num_levels)
        k = int(np.argmin(costs))
        return float(whole - costs[k]), lo + k + 1

    runs = [(0, len(names))]
    current = float(_group_costs(hist.sum(0, keepdims=True), num_levels)[0])
    cache = {runs[0]: best_split(*runs[0])}
    while len(runs) < max_types:
        run = max(runs, key=lambda r: cache[r][0])
        gain, s = cache[run]
        if s < 0 or gain <= rel_threshold * current or gain <= 0.0:
            break
        current -= gain
        i = runs.index(run)
        runs[i : i + 1] = [(run[0], s), (s, run[1])]
        for r in runs[i : i + 2]:
            cache[r] = best_split(*r)
    type_ids = {}
    for tid, (lo, hi) in enumerate(runs):
        for j in range(lo, hi):
            type_ids[names[order[j]]] = tid
    type_ids = {n: type_ids[n] for n in names}
    return LayerTyping(type_ids, tuple(f"auto{i}" for i in range(len(runs))), frozenset(skip), dict(numels or {}))
