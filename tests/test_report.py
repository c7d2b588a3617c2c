"""``moe-compress report``: the table and the PNG plots on two tiny checkpoints; the energy numerics; re-runs."""

import json
import math

import matplotlib.image
import pytest
import torch

from vllm_moe_compress.offline.cli import main
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.evaluation import perplexity, report
from vllm_moe_compress.offline.evaluation.plots import allocation_fields
from vllm_moe_compress.offline.evaluation.spectrum import cumulative_energy, layer_spectra

from conftest import CALIBRATION_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tiny_moe, tmp_path_factory):
    """The tiny qwen3_moe model and two compressions of it: d2 (shared base) and svd (no base)."""
    original = tiny_moe("qwen3_moe")
    root = tmp_path_factory.mktemp("report-ckpts")
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, batch_size=4, fisher_samples=4)
    out = {}
    for method in ("d2", "svd"):
        out[method] = root / f"tiny-{method}-10"
        compress_checkpoint(original, out[method], build_method(method), 0.1, calibration, dtype="float32",
                            progress=False)
    return original, out


@pytest.fixture
def data_dir(tmp_path):
    text = tmp_path / "data" / "brown" / "test.txt"
    text.parent.mkdir(parents=True)
    text.write_text(CALIBRATION_FILE.read_text()[:20000])
    return tmp_path / "data"


def zeroshot_result(model, accs: dict[str, float], limit: int) -> dict:
    """A result file as eval-zeroshot writes it (the report only reads it)."""
    return {"model": str(model), "kind": "zeroshot", "limit": limit,
            "tasks": {t: {"acc": a, "acc_norm": a / 2, "samples": limit, "samples_total": 100} for t, a in accs.items()}}


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_report_table_and_plots(checkpoints, data_dir, tmp_path, capsys, monkeypatch):
    original, ckpts = checkpoints
    accs = {"arc_easy": 0.31, "boolq": 0.55}
    results = tmp_path / "zs.json"
    results.write_text(json.dumps(zeroshot_result(ckpts["d2"], accs, 7)))
    out = tmp_path / "report"
    args = ["report", str(ckpts["d2"]), str(ckpts["svd"]), "--original", str(original), "--out", str(out),
            "--results", str(results), "--ppl-datasets", "brown", "--data-dir", str(data_dir),
            "--ppl-seqlen", "128", "--ppl-max-tokens", "512", "--no-progress"]
    assert main(args) == 0

    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [original.name, "tiny-d2-10", "tiny-svd-10"]
    assert [r["method"] for r in rows] == ["original", "d2", "svd"]
    for r, ckpt in zip(rows[1:], ckpts.values()):
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        assert r["achieved_ratio"] == qc["achieved_ratio"] and r["params"] == qc["compressed_params"]
    assert rows[0]["params"] == json.loads((ckpts["d2"] / "config.json").read_text())[
        "quantization_config"]["original_params"]
    assert rows[1]["bytes"] < rows[0]["bytes"] and rows[2]["bytes"] < rows[0]["bytes"]
    assert all(math.isfinite(r["ppl"]["brown"]) and r["ppl"]["brown"] > 1 for r in rows)
    assert rows[1]["accuracy"]["arc_easy"]["acc"] == 0.31 and rows[1]["zeroshot_limit"] == 7
    assert rows[0]["accuracy"] == {} and rows[2]["accuracy"] == {}

    table = (out / "report.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["model", "method", "target", "achieved", "params", "MiB", "PPL brown", "ARC-e", "BoolQ",
                      "mean acc", "zero-shot limit"]
    body = [line for line in table[2:] if line.startswith("|")]
    assert len(body) == 3
    d2_cells = [c.strip() for c in body[1].strip("|").split("|")]
    assert d2_cells[7:] == ["0.310", "0.550", "0.430", "7"]

    for row in rows[1:]:
        for kind in ("routing", "allocation", "energy"):
            assert_png(out / row["plots"][kind])
    assert rows[0]["plots"] == {}
    for proj, energy in rows[1]["energy_at_stored_rank"].items():
        assert 0 < energy["original"] <= 1 and 0 < energy["delta"] <= 1, proj
    svd_energy = rows[2]["energy_at_stored_rank"]["gate"]
    assert svd_energy["original"] == svd_energy["delta"]  # no base: the delta is the expert itself
    assert "wrote" in capsys.readouterr().out

    # A re-run takes perplexity from the cache: nothing is recomputed.
    def fail(*a, **k):
        raise AssertionError("perplexity recomputed")

    monkeypatch.setattr(perplexity, "checkpoint_perplexity", fail)
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["rows"] == rows
    assert not [p for p in out.rglob(".*partial*")]


def test_report_rejects_unknown_results(checkpoints, tmp_path, capsys):
    _, ckpts = checkpoints
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": str(ckpts["svd"]), "something": 1}))
    assert main(["report", str(ckpts["svd"]), "--out", str(tmp_path / "r"), "--results", str(bad)]) == 2
    assert "neither eval-zeroshot nor eval-ppl" in capsys.readouterr().err


def test_cumulative_energy_of_known_spectrum():
    """E(k) = cumsum(s^2) / sum(s^2) for a matrix built from random orthogonal factors and chosen s."""
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(12, generator=gen, dtype=torch.float64).sort(descending=True).values + 0.1
    u, _ = torch.linalg.qr(torch.randn(20, 12, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 12, generator=gen, dtype=torch.float64))
    expected = torch.cat([s.square().cumsum(0) / s.square().sum(), torch.ones(4, dtype=torch.float64)])  # rank 12 of 16
    assert torch.allclose(cumulative_energy(u @ torch.diag(s) @ v.T), expected, atol=1e-12)


def test_spectra_deltas_are_original_minus_base(checkpoints):
    """delta curves equal the energy of W_i - scatter(B) (d2), and of W_i itself without a base (svd)."""
    from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint

    original, ckpts = checkpoints
    d2 = layer_spectra(original, ckpts["d2"], 1)
    svd = layer_spectra(original, ckpts["svd"], 1)
    w = SafetensorsCheckpoint(original).get("model.layers.1.mlp.experts.3.down_proj.weight").double()
    base = SafetensorsCheckpoint(ckpts["d2"]).get("model.layers.1.mlp.experts.base.down_proj.weight").double()
    channels = SafetensorsCheckpoint(ckpts["d2"]).get("model.layers.1.mlp.experts.base.channels").long()
    scattered = torch.zeros_like(w)
    scattered[:, channels] = base
    assert torch.allclose(d2["down"].delta[3], cumulative_energy(w - scattered), atol=1e-12)
    assert torch.allclose(d2["down"].original[3], cumulative_energy(w), atol=1e-12)
    assert svd["down"].base is None and torch.equal(svd["down"].delta, svd["down"].original)
    qc = json.loads((ckpts["d2"] / "config.json").read_text())["quantization_config"]
    assert d2["gate"].stored_rank == qc["layers"]["1"]["ranks"]["gate"]
    assert 0 < d2["gate"].retained_at_stored_rank(d2["gate"].delta) <= 1


def test_allocation_fields_tolerate_missing_and_new_fields():
    layers = {
        "0": {"routing_counts": [3, 1], "ranks": {"gate": [2, 1], "down": [1, 1]}, "base_channels": 4,
              "kept_channels": [5, 6]},
        "1": {"routing_counts": [2, 2], "ranks": {"gate": [0, 3], "down": [2, 2]}, "kept_channels": [7, 8]},
    }
    grids, bars = allocation_fields(layers)
    assert grids == {"rank gate": [[2, 1], [0, 3]], "rank down": [[1, 1], [2, 2]], "kept channels": [[5, 6], [7, 8]]}
    assert bars == {}  # base_channels is missing from layer 1


def test_unique_names(tmp_path):
    dirs = [tmp_path / "a" / "d2-20", tmp_path / "b" / "d2-20", tmp_path / "b" / "svd-20"]
    assert report.unique_names(dirs) == ["a-d2-20", "b-d2-20", "svd-20"]
