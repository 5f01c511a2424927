"""Measured latency: tandem/latency.py, each results row, the report's ranking, tandem profile."""
import json

import pytest
import torch
import torch.nn as nn

import tandem
from tandem.latency import CPU_FLAGS, measure


def test_measure_times_eager_and_onnxruntime():
    m = measure(tandem.create_model("resnet20", num_classes=10), (3, 32, 32), batch=8, rounds=3, threads=1)
    ms, setup = m["latency_ms"], m["latency_setup"]
    assert set(ms) == {"eager", "onnxruntime"} and all(set(v) == {"1", "8"} for v in ms.values())
    assert all(ms[r]["8"] > ms[r]["1"] > 0 for r in ms)        # eight images take longer than one
    assert setup["threads"] == 1 and setup["rounds"] == 3 and set(setup["cpu_flags"]) <= set(CPU_FLAGS)
    assert setup["onnxruntime"]["intra_op_threads"] == 1


class NoExport(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs().flatten(1)   # no ONNX export for complex numbers


def test_a_model_that_does_not_export_keeps_its_eager_latency():
    m = measure(NoExport(), (1, 8, 8), batch=4, rounds=2)
    assert set(m["latency_ms"]) == {"eager"} and "onnx_error" in m["latency_setup"]


def test_rows_report_and_ranking_by_latency(tmp_path, capsys, refused):
    from tandem.cli import main
    out = tmp_path / "run"
    assert main(["run", "recipes/digits-qat.yaml", "train.epochs=1", "quant.epochs=1", "train.progress=false",
                 "report.cost=latency", "report.latency_batch=16", "--out", str(out)]) == 0
    rows = [r for r in json.loads((out / "results.json").read_text())["models"] if not r.get("init")]
    assert all(r["ort_ms_1"] > 0 and r["ort_ms_batch"] > 0 and r["eager_ms_1"] > 0 and r["latency_batch"] == 16
               for r in rows)
    report = (out / "report.md").read_text()
    assert "onnxruntime ms (batch 1)" in report
    assert "Pareto front (best test top-1 for at most its onnxruntime latency (ms, latency batch)" in report
    refused(["recipes/digits-qat.yaml"], [(["report.cost=latency", "report.latency=false"],
                                           "cost 'latency' needs latency: true")])
    capsys.readouterr()
    assert main(["profile", str(out / rows[-1]["model_file"]), "--latency", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "latency onnxruntime:" in printed and "ms at batch 32" in printed
