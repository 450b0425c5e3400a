"""Layer typing, automatic typing, layer-wise vs global MQV, the adaptive level state."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from qoda_hvd.quant import (
    UNCOMPRESSED_TYPE_ID,
    LayerTyping,
    LayerwiseQuantizer,
    auto_layer_typing,
    classify_parameters,
    expected_variance,
    normalized_histogram,
    optimal_levels,
    uniform_levels,
)

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(500, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4)
        self.q_proj = nn.Linear(32, 64)
        self.ffn = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 500)

    def forward(self, tok):
        h = self.embed(tok)  # (T, B, C)
        h = h + self.conv(h.permute(1, 2, 0)).permute(2, 0, 1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h + self.ffn(h) + self.q_proj(h)[..., :32])
        return self.lm_head(h)


def test_default_rules():
    t = classify_parameters(Net())
    assert t.type_name("embed.weight") == "embedding"
    assert t.type_name("conv.weight") == "convolution"
    assert t.type_name("attn.in_proj_weight") == "attention"
    assert t.type_name("attn.out_proj.weight") == "attention"
    assert t.type_name("q_proj.weight") == "attention"
    assert t.type_name("ffn.0.weight") == "feedforward" and t.type_name("ffn.2.weight") == "feedforward"
    assert t.type_name("lm_head.weight") == "output"
    for small in ("norm.weight", "norm.bias", "conv.bias", "lm_head.bias", "attn.in_proj_bias"):
        assert small in t.uncompressed and t.type_id(small) == UNCOMPRESSED_TYPE_ID
    assert t.type_names == ("embedding", "attention", "feedforward", "convolution", "output")
    assert t.type_numels()[0] == 500 * 32


def test_last_linear_is_head_and_min_numel():
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    t = classify_parameters(m, min_numel=100)
    assert [t.type_name(f"{i}.weight") for i in range(3)] == ["feedforward", "feedforward", "output"]
    assert classify_parameters(m, min_numel=100, output_head=None).type_name("2.weight") == "feedforward"
    assert "2.weight" in classify_parameters(m, min_numel=1000).uncompressed


def test_overrides_first_match_wins():
    over = [("re:^ffn\\.0\\.", "first_ffn"), ("ffn.*", "uncompressed"), ("*.weight", "feedforward")]
    t = classify_parameters(Net(), overrides=over)
    assert t.type_name("ffn.0.weight") == "first_ffn"
    assert t.type_name("ffn.0.bias") == "first_ffn"  # overrides beat the size rule
    assert "ffn.2.weight" in t.uncompressed
    assert t.type_name("embed.weight") == "feedforward"
    assert t.type_names[-1] == "first_ffn"


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"model": "net"}, TypeError, r"model must be a torch.nn.Module, got str"),
        ({"min_numel": -1}, ValueError, r"min_numel must be an int in \[0, 2147483648\], got -1"),
        ({"output_head": "last"}, ValueError, r"output_head must be one of"),
        ({"overrides": [("a", 3)]}, TypeError, r"overrides must be \(pattern, type_name\) string pairs"),
        ({"overrides": {"re:(": "x"}}, ValueError, r"invalid regex override"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = {"model": Net()}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        classify_parameters(args.pop("model"), **args)


def _real_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 500, (12, 8), generator=g)
    model(tok).logsumexp(-1).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_layerwise_mqv_never_worse_than_global():
    torch.manual_seed(0)  # model init only; quantization randomness is explicit below
    model = Net()
    grads = _real_gradients(model)
    typing = classify_parameters(model)
    lq = LayerwiseQuantizer(typing, bits=3, bucket_size=256, bins=256)
    for n, gr in grads.items():
        lq.observe(n, gr)
    h = lq.histograms().view(typing.num_types, -1).numpy()
    pooled = h.sum(0)
    global_levels = optimal_levels(pooled, 4)
    global_mqv = pooled.sum() * expected_variance(global_levels, pooled)
    layer_mqv = sum(h[t].sum() * expected_variance(optimal_levels(h[t], 4), h[t]) for t in range(typing.num_types))
    assert layer_mqv <= global_mqv
    assert layer_mqv < 0.999 * global_mqv  # heterogeneous layers: a strict gain


def test_auto_typing_finds_the_groups():
    rng = np.random.default_rng(0)
    hists, truth = {}, {}
    for k, scale in enumerate((0.01, 0.05, 0.3)):
        for i in range(4):
            u = np.clip(np.abs(rng.standard_normal(20000)) * scale, 0, 1)
            hists[f"g{k}.l{i}"] = np.histogram(u, bins=256, range=(0, 1))[0].astype(float)
            truth[f"g{k}.l{i}"] = k
    t = auto_layer_typing(hists, 8, uncompressed={"g0.l0"})
    assert t.num_types == 3
    assert "g0.l0" in t.uncompressed
    for a in truth:
        for b in truth:
            if a != "g0.l0" and b != "g0.l0":
                assert (t.type_id(a) == t.type_id(b)) == (truth[a] == truth[b])
    same = {f"l{i}": hists["g1.l0"] for i in range(5)}
    assert auto_layer_typing(same, 8).num_types == 1
    with pytest.raises(ValueError, match=r"rel_threshold must be in \[0, 1\), got 2"):
        auto_layer_typing(same, 8, rel_threshold=2)


def test_schedule_and_deterministic_updates():
    model = Net()
    typing = classify_parameters(model)
    a = LayerwiseQuantizer(typing, bits=4)
    b = LayerwiseQuantizer(typing, bits=4)
    assert [s for s in range(25001) if a.should_update(s)] == [0, 200, 1000, 5000, 10000, 20000]
    assert not LayerwiseQuantizer(typing, family="uniform").should_update(0)
    grads = _real_gradients(model)
    for n, gr in grads.items():
        a.observe(n, gr)
    flat = a.histograms()
    assert flat.dtype == torch.float64 and flat.numel() == typing.num_types * 1024
    a.set_histograms(flat)
    b.set_histograms(flat.clone())
    for t in range(typing.num_types):
        assert torch.equal(a.levels(t), b.levels(t))
        assert not torch.equal(a.levels(t), uniform_levels(8))
    assert a.histograms().sum() == 0  # accumulators cleared
    g = torch.Generator().manual_seed(0)
    qt = a.quantize_named("ffn.0.weight", grads["ffn.0.weight"], g)
    assert qt.num_levels == 8 and a.dequantize_named("ffn.0.weight", qt).shape == grads["ffn.0.weight"].shape
    assert a.quantize_named("norm.bias", grads["norm.bias"], g) is None
    c = LayerwiseQuantizer(typing)
    c.load_state_dict(a.state_dict())
    assert all(torch.equal(c.levels(t), a.levels(t)) for t in range(typing.num_types))
    with pytest.raises(ValueError, match=r"aggregated must have num_types \* bins"):
        a.set_histograms(torch.zeros(3))


def test_allocation_mode_stays_in_budget():
    model = Net()
    typing = classify_parameters(model)
    lq = LayerwiseQuantizer(typing, bits=4, allocate=True, bins=256)
    grads = _real_gradients(model)
    for n, gr in grads.items():
        lq.observe(n, gr)
    h = lq.histograms()
    lq.set_histograms(h)
    hh = h.view(typing.num_types, -1).numpy()
    w = np.array(typing.type_numels(), float)
    var = sum(w[t] * expected_variance(lq.levels(t), hh[t]) for t in range(typing.num_types))
    ref = sum(w[t] * expected_variance(uniform_levels(8), hh[t]) for t in range(typing.num_types))
    assert var <= ref * (1 + 1e-9)


def test_normalized_histogram_counts():
    x = torch.randn(10_000)
    h = normalized_histogram(x, bins=64, bucket_size=1000, sample_size=10_000)
    assert float(h.sum()) == pytest.approx(10_000)
    u = (x.view(10, 1000).abs() / x.view(10, 1000).norm(dim=1, keepdim=True)).reshape(-1)
    assert torch.equal(h, torch.histc(u, bins=64, min=0, max=1).double())
    assert LayerTyping({}, (), frozenset()).num_types == 0
