"""The runnable examples: each one on 2 real ranks (mpirun) at tiny sizes on their default real
data (the handwritten digits, the standard library's sources) and on the synthetic 32x32 images,
outputs checked (PNG, CSV, checkpoint, the FID analogue, the LM's validation loss and sample),
resume continuing the step count; plus their helpers in one process (help texts, PNG writer,
FID / IS arithmetic).

Only rank 0 writes to stdout, one write per line (_common.Context.print), so the ranks' output
cannot interleave inside a line the tests read."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import struct
import sys
import zlib

import pytest
import torch

from qoda_hvd.launcher import run_local

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
SUMMARY = re.compile(r"(?P<name>\w+): (?P<opt>[\w-]+), 2 ranks, steps (?P<first>\d+)-(?P<last>\d+) "
                     r"\((?P<n>\d+) this run\), [\d.]+ s, (?P<ex>\d+) exchanges \((?P<per>[\d.]+) "
                     r"per iteration\), (?P<comp>\w+) (?P<bits>[\d.]+) bits/coordinate, "
                     r"(?P<ratio>[\d.]+)x smaller than fp32")


def load_example(name: str):
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def launch(example: str, *args: str, timeout: float = 240):
    """Run an example on 2 ranks; return (summary match, stdout)."""
    proc = run_local(2, [sys.executable, os.path.join(EXAMPLES, f"{example}.py"), *args], "mpirun",
                     timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = SUMMARY.search(proc.stdout)
    assert m, f"no summary line in:\n{proc.stdout[-3000:]}"
    return m, proc.stdout


def png_size(path) -> tuple[int, int]:
    """Check a PNG chunk by chunk (signature, IHDR first, CRCs, IDAT size); return (w, h)."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        tag, body = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (depth, colour) == (8, 2)  # 8-bit RGB
    pixels = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    assert len(pixels) == h * (1 + 3 * w)
    return w, h


def read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    return header, rows


# -- one process -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["wgan_gp", "transformer_lm", "vi_games"])
def test_help_explains_every_option(name):
    parser = load_example(name).build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name}: {action.option_strings} has no help"
    for option in ("--steps", "--optimizer", "--compression", "--bits", "--coding", "--exchange",
                   "--device", "--out", "--resume"):
        assert option in text


def test_png_writer_round_trips_pixels(tmp_path):
    common = load_example("_common")
    images = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = common.image_grid(images, columns=3, pad=1)
    assert grid.shape == (1 + 2 * 5, 1 + 3 * 7, 3)
    common.write_png(str(tmp_path / "g.png"), grid)
    assert png_size(tmp_path / "g.png") == (22, 11)
    raw = zlib.decompress(open(tmp_path / "g.png", "rb").read()[33 + 8:-12])  # IHDR 25 bytes
    rows = [raw[r * 67 + 1:(r + 1) * 67] for r in range(11)]
    assert bytes(grid.reshape(11, -1)[3]) == rows[3]


def test_frechet_distance_and_inception_score_arithmetic():
    wgan = load_example("wgan_gp")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    shift = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert abs(wgan.frechet_distance(a, a)) < 1e-8
    # Same covariance, means 5 apart: FID = 25 up to sampling error (~ sqrt(3/4000) each).
    assert wgan.frechet_distance(a + shift, b) == pytest.approx(25.0, abs=0.6)
    # Scaled by 2: FID = tr(S) (1 + 4 - 2 * 2) = 3.
    assert wgan.frechet_distance(2 * a, b) == pytest.approx(3.0, abs=0.3)
    # Confident predictions of 4 equally frequent classes: IS = 4.
    logits = torch.full((40, 4), -50.0)
    logits[torch.arange(40), torch.arange(40) % 4] = 50.0
    assert wgan.inception_score(logits, splits=2)[0] == pytest.approx(4.0)


# -- two ranks -----------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_wgan_gp_outputs_and_resume(tmp_path):
    out = str(tmp_path / "wgan")
    # The default data: the 8x8 digits (the classifier of the FID analogue is trained once per
    # machine and cached).
    tiny = ["--filters", "16", "--latent", "16", "--batch", "8", "--grid", "4",
            "--sample-every", "2", "--log-every", "1", "--save-every", "2", "--fid-samples", "16",
            "--out", out]
    m, stdout = launch("wgan_gp", "--steps", "3", *tiny)
    assert (m["opt"], m["first"], m["last"], m["ex"], m["per"]) == ("qoda", "1", "3", "3", "1")
    assert m["comp"] == "layerwise" and 0 < float(m["bits"]) < 8
    assert "handwritten digits, 8x8 grey, training split (1397 images" in stdout
    start = re.search(r"at the start: FID analogue ([\d.]+) \(16 generated vs 16 held-out digits; "
                      r"real training digits score ([\d.]+)\)", stdout)
    end = re.search(r"at step 3: FID analogue ([\d.]+) .*; ([\d.]+) at the start\), label "
                    r"entropy [\d.]+ of ln 10 = 2.30, \d+/10 digits covered \(classifier test "
                    r"accuracy ([\d.]+)\)", stdout)
    assert start and end, stdout[-3000:]
    assert float(start[1]) > float(start[2]) > 0  # untrained G scores worse than real digits
    assert end[2] == f"{float(start[1]):.1f}" and float(end[3]) > 0.9
    assert re.search(r"^wgan_gp: qoda, 2 ranks, .*, FID analogue [\d.]+$", stdout, re.M)
    # 4 samples in a 2 x 2 grid of 8 px digits shown 4x, 1 px padding.
    assert png_size(os.path.join(out, "samples_0000002.png")) == (67, 67)
    assert png_size(os.path.join(out, "samples_0000003.png")) == (67, 67)
    header, rows = read_csv(os.path.join(out, "metrics.csv"))
    assert header[:6] == ["step", "loss_d", "loss_g", "wasserstein", "gradient_penalty",
                          "fid_analogue"]
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(float(r["gradient_penalty"]) >= 0 for r in rows)
    assert float(rows[0]["fid_analogue"]) == pytest.approx(float(start[1]), rel=1e-4)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"))  # weights_only: plain containers
    assert ckpt["step"] == 3 and any(k.startswith("G.") for k in ckpt["model"])
    assert any(k.startswith("D.") for k in ckpt["model"]) and "qoda_hvd" in ckpt["optimizer"]

    m, _ = launch("wgan_gp", "--steps", "5", "--resume", *tiny)
    assert (m["first"], m["last"], m["n"], m["ex"]) == ("4", "5", "2", "2")
    _, rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"]  # appended, not restarted
    assert [int(r["exchanges"]) for r in rows] == [1, 2, 3, 4, 5]  # totals continue as well
    assert torch.load(os.path.join(out, "checkpoint.pt"))["step"] == 5
    assert os.path.exists(os.path.join(out, "samples_0000004.png"))


@pytest.mark.timeout(300)
def test_wgan_gp_on_32x32_images(tmp_path):
    out = str(tmp_path / "wgan32")
    m, stdout = launch("wgan_gp", "--data", "synthetic", "--steps", "2", "--filters", "8",
                       "--latent", "16", "--batch", "4", "--synthetic-size", "16", "--grid", "4",
                       "--fid-samples", "8", "--out", out)
    assert (m["last"], m["ex"]) == ("2", "2")
    assert "SYNTHETIC" in stdout
    assert "FID/IS: not computed" in stdout or "FID " in stdout  # weights are rarely on disk
    # 4 samples in a 2 x 2 grid of 32 px images with 2 px padding.
    assert png_size(os.path.join(out, "samples_0000002.png")) == (70, 70)


@pytest.mark.timeout(200)
def test_transformer_lm_reports_layer_types(tmp_path):
    out = str(tmp_path / "lm")
    # The default data: the standard library's sources, character level.
    m, stdout = launch("transformer_lm", "--layers", "2", "--d-model", "32", "--heads", "2",
                       "--d-ff", "64", "--seq-len", "16", "--batch", "4", "--steps", "3",
                       "--max-chars", "20000", "--eval-every", "3", "--eval-batches", "1",
                       "--log-every", "1", "--optimizer", "optimistic-adam",
                       "--sample-tokens", "40", "--out", out)
    assert (m["opt"], m["ex"], m["per"]) == ("optimistic-adam", "3", "1")
    assert "the Python standard library's sources" in stdout
    vocab = int(re.search(r"char vocabulary (\d+),", stdout).group(1))
    types = re.search(r"layer types: (.*)", stdout).group(1)
    for name in ("embedding", "attention", "feedforward", "output"):
        assert re.search(rf"{name} \d+ params 8 levels 4 bits/symbol", types), types
    ppl = float(re.search(r"val perplexity ([\d.]+)", stdout).group(1))
    assert 1 < ppl < 2 * vocab  # nearly untrained: about a uniform guess
    loss = re.search(r"validation loss ([\d.]+) nats/char \(([\d.]+) bits/char", stdout)
    assert loss and float(loss[1]) == pytest.approx(math.log(ppl), abs=0.01)
    sample = re.search(r"sample \(40 tokens after 'def ', temperature 0.8\):\n  \| def ", stdout)
    assert sample, stdout[-2000:]
    header, rows = read_csv(os.path.join(out, "metrics.csv"))
    assert header[:4] == ["step", "loss", "val_loss", "val_perplexity"] and len(rows) == 3
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"))
    assert ckpt["step"] == 3 and ckpt["vocab"][0] == "<unk>" and "lm_head.weight" in ckpt["model"]


@pytest.mark.timeout(200)
def test_vi_games_extragradient_exchanges_twice_per_iteration(tmp_path):
    out = str(tmp_path / "vi")
    m, stdout = launch("vi_games", "--optimizer", "extragradient", "--dim", "32", "--steps", "6",
                       "--log-every", "2", "--out", out)
    assert (m["opt"], m["ex"], m["per"]) == ("extragradient", "12", "2")
    distance = re.search(r"distance ([\d.e+-]+) \(start ([\d.e+-]+)\)", stdout)
    assert float(distance.group(1)) < float(distance.group(2))
    _, rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [int(r["exchanges"]) for r in rows] == [4, 8, 12]
    assert float(rows[-1]["gap"]) >= 0
