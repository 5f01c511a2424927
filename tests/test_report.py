"""Reports that decide: numeric MAC-weighted bits with per-layer detail, the verdict and the
noise level in report.md, and the accuracy-vs-cost plot with its Pareto front."""

import json
import math

import pytest
import torch

import tandem
from tandem import cost
from tandem.models import create_model
from tandem.quant import calibrate
from tandem.recipes import Recipe, load_recipe
from tandem.report import markdown_table, write_report
from tandem.report.plot import _log_ticks, _si, pareto_front
from tandem.report.results import standard_error, verdict
from tandem.runner import RunContext


def _mixed_net():
    """small_cnn at W4A4 with the first and last layer at 8 bits: mixed precision."""
    torch.manual_seed(0)
    net = tandem.quantize_(create_model("small_cnn", num_classes=10, in_channels=1),
                           method="lsq", w_bits=4, a_bits=4, first_last=8)
    calibrate(net, [torch.rand(8, 1, 8, 8)])
    return net


def test_mixed_precision_bits_are_mac_weighted_means():
    c = cost.profile(_mixed_net(), (1, 8, 8))
    layers = cost.layer_summary(c)
    assert {(l["w_bits"], l["a_bits"]) for l in layers} == {(8, 8), (4, 4)}    # mixed, so a real mean
    assert sum(l["macs"] for l in layers) == c.macs
    assert set(layers[0]) == {"name", "in_channels", "out_channels", "macs", "w_bits", "a_bits"}
    w, a = cost.bits_summary(c)
    by_hand = sum(l["macs"] * l["w_bits"] for l in layers) / sum(l["macs"] for l in layers)
    assert isinstance(w, float) and 4 < w < 8 and w == round(by_hand, 2)
    assert a == round(sum(l["macs"] * l["a_bits"] for l in layers) / c.macs, 2)
    # every layer agreeing gives a plain int
    assert cost.bits_summary(cost.profile(create_model("small_cnn", in_channels=1), (1, 8, 8))) == (32, 32)


def test_record_row_has_layers_and_numeric_bits(tmp_path, one_thread):
    ctx = RunContext(load_recipe(None, ["train.progress=false"]), tmp_path / "run")
    row = ctx.record("q", _mixed_net().to(ctx.device), 0.0)
    assert sum(l["macs"] for l in row["layers"]) == row["macs"]
    assert isinstance(row["w_bits"], float) and isinstance(row["a_bits"], float)
    assert (row["w_bits"], row["a_bits"]) == cost.bits_summary(cost.profile(_mixed_net(), ctx.input_size))


def test_pareto_front_by_hand():
    points = [(10, 80), (5, 85), (20, 90), (15, 70), (5, 60), (30, 90), (40, 95, "big")]
    assert pareto_front(points) == [(5, 85), (20, 90), (40, 95, "big")]
    assert pareto_front([]) == [] and pareto_front([(1, 50)]) == [(1, 50)]
    assert pareto_front([(2, 50), (2, 50)]) == [(2, 50)]


def test_plain_log_ticks():
    assert _si(2_500_000) == "2.5M" and _si(1e9) == "1G" and _si(250e3) == "250k" and _si(0.5) == "0.5"
    for lo, hi in ((1e5, 1.5e5), (3e4, 2e11), (1, 10), (0.3, 0.6)):
        ticks = _log_ticks(lo, hi)
        assert 2 <= len(ticks) <= 8 and all(lo <= t <= hi for t in ticks)


def _results(rows, test_images=360):
    recipe = Recipe(name="report-test", method=["mutual", "pqkd"]).model_dump(mode="json")
    return {"recipe": recipe, "protocol": "cpu-small", "methods": ["mutual", "pqkd"], "models": rows,
            "commit": "abc", "machine": {"torch": "x", "cpus": 2}, "wall_time_s": 1.0, "device": "cpu",
            "world_size": 1, "train_images": 1293, "val_images": 144, "test_images": test_images}


def _row(name, top1, macs, w=32, a=32, **extra):
    return {"name": name, "top1": top1, "val_top1": top1, "params": macs / 10, "macs": macs,
            "bops": macs * w * a, "bytes": macs / 5, "w_bits": w, "a_bits": a, **extra}


MANY = [_row("baseline", 95.0, 1e6),
        _row("mutual/pruned", 94.0, 4e5),
        _row("mutual/quantized", 93.1, 1e6, 4.5, 4.5),
        _row("independent/quantized", None, 1e6, 4, 4),
        _row("pqkd/distilled", 90.0, 4e5, 2, 2),
        _row("pqkd/no-kd", 89.0, 4e5, 2, 2)] + [_row(f"grid/cell{i}", 80 + i, 1e5 * (i + 1), 8, 8) for i in range(12)]


@pytest.mark.parametrize("rows", [[_row("baseline", 95.0, 1e6)], MANY], ids=["one", "many"])
def test_write_report_files_and_verdict(tmp_path, rows):
    write_report(tmp_path, _results([dict(r) for r in rows]))
    png = tmp_path / "accuracy_vs_cost.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["test_images"] == 360 and all(isinstance(r["w_bits"], (int, float)) for r in back["models"])
    md = (tmp_path / "report.md").read_text()
    se = standard_error(95.0, 360)
    assert se == pytest.approx(100 * math.sqrt(0.95 * 0.05 / 360))
    assert "1293 train / 144 val / 360 test images" in md and "seed 0" in md and "`mutual, pqkd`" in md
    assert "360 images" in md and f"{se:.2f} points" in md and "not distinguishable on one seed" in md
    assert "- Most accurate: baseline 95.00%" in md
    for column in ("**MACs (M)**", "**BOPs (G)**", "**W bits**", "**A bits**", "**size (KiB)**", "**val top-1 %**"):
        assert column in md
    if len(rows) > 1:
        assert "- Best at <= 1/32 of the baseline's BOPs: mutual/quantized 93.10% (1/51 of the baseline's BOPs" in md
        assert "- Best at <= 1/2 of the baseline's MACs: mutual/pruned 94.00%" in md
        assert "Cheapest within 2 standard errors" in md and "Pareto front" in md
        assert "| 4.5 | 4.5 |" in md and "| independent/quantized | - |" in md


def test_report_without_baseline_or_test_size(tmp_path):
    rows = [_row("a/x", 70.0, 1e6), _row("b/y", None, 1e5, 4, 4)]
    results = _results(rows, test_images=None)
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert "standard error of these accuracies is unknown" in md and "the largest row's" in md
    assert verdict([_row("a", None, 1e6)]) == ["- No row has a test top-1: nothing to compare."]
    old = _row("old", 90.0, 1e6) | {"w_bits": "mixed", "a_bits": "mixed"}   # an older results.json
    assert "| mixed | mixed |" in markdown_table([old])


def test_one_gain_column_from_each_rows_control(tmp_path):
    rows = [_row("baseline", 95.0, 1e6),
            _row("independent/pruned", 93.0, 4e5), _row("mutual/pruned", 93.62, 4e5, control="independent/pruned"),
            _row("pqkd/no-kd", 89.0, 4e5, 2, 2), _row("pqkd/distilled", 90.5, 4e5, 2, 2, control="pqkd/no-kd"),
            _row("sbs/uniform-control", 91.0, 4e5, 4, 4), _row("sbs/random-control", 92.0, 4e5, 4, 4),
            _row("sbs/compressed", 91.5, 4e5, 4, 4, control=["sbs/uniform-control", "sbs/random-control", "gone"])]
    write_report(tmp_path, _results([dict(r) for r in rows]))
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.count("gain") == 1 and "top-1 gain over its control (pp)" in header   # one column, every method
    assert "| +0.62 (independent/pruned) |" in md and "| +1.50 (pqkd/no-kd) |" in md
    assert "| +0.50 (sbs/uniform-control); -0.50 (sbs/random-control) |" in md   # a missing control is skipped
    assert "| independent/pruned | 93.00 |" in md and "**top-1 gain over its control (pp)**: test top-1 minus" in md
    back = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["models"]}
    assert back["mutual/pruned"]["gain_over_independent"] == pytest.approx(0.62)     # results.json as before
