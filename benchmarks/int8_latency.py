"""CPU inference latency of tandem's int8 ONNX against FP32, per runtime, with onnxruntime's own
quantize_static of the same FP32 graph as the anchor.

For each model (resnet20 and resnet56 at 32x32, resnet18 at 224x224; random weights, BN
statistics from 3 batches) three files: FP32 (tandem.export.export_onnx of the float model, BN
folded), tandem's int8 in both activation layouts (min-max W8A8 in every layer, per-channel
weights, calibrated on the same batch; quant.layout deploy, whose ratio is `int8_over_fp32`, and
the papers' inputs-only placement) and the anchor (onnxruntime.quantization.quantize_static of the FP32 file: QDQ, per-channel
int8 weights, uint8 activations, the same calibration batch). Each runs in onnxruntime and in
OpenVINO (tandem.export.runtime: the settings are recorded). Timing is side by side: interleaved
rounds, the order rotating, median over rounds of the per-round ratio to FP32 in the same runtime.

    python benchmarks/int8_latency.py --threads 2 --rounds 7
"""
from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from common import interleaved_times, median_ratio, write_result
from tandem.export import export_onnx, open_runtime
from tandem.models import create_model
from tandem.quant import calibrate, quantize_

MODELS = {"resnet20": (32, {}), "resnet56": (32, {}), "resnet18": (224, {})}


def anchor(fp_path: Path, out: Path, x: np.ndarray) -> Path:
    """onnxruntime's static QDQ quantization of the FP32 file, calibrated on `x`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def ort_ops(path: Path, threads: int) -> dict:
    """Operators onnxruntime runs after its graph optimisations (how many convs became QLinearConv)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3   # not the warning that an optimised file is machine-specific
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {k: v for k, v in ops.items() if "Conv" in k or k in ("QLinearAdd", "Add", "QGemm", "Gemm")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    entries, files_info, config = [], {}, {}
    for name in a.models:
        size, options = MODELS[name]
        torch.manual_seed(0)
        x = torch.randn(32, 3, size, size)
        fp = create_model(name, num_classes=10 if size == 32 else 1000, **options)
        fp.train()
        with torch.no_grad():
            for _ in range(3):
                fp(x)
        fp.eval()
        files = {"fp32": export_onnx(fp, tmp / f"{name}-fp32.onnx", (3, size, size)).path}
        for layout in ("inputs", "deploy"):
            q = quantize_(create_model(name, num_classes=10 if size == 32 else 1000, **options), method="minmax",
                          w_bits=8, a_bits=8, per_channel=True, first_last="same", layout=layout)
            q.load_state_dict(fp.state_dict(), strict=False)
            calibrate(q, [x])
            files[f"tandem_int8_{layout}"] = export_onnx(q.eval(), tmp / f"{name}-int8-{layout}.onnx",
                                                         (3, size, size)).path
        files["ort_quantize_static"] = str(anchor(Path(files["fp32"]), tmp / f"{name}-anchor.onnx", x.numpy()))
        files_info[name] = {k: {"bytes": Path(f).stat().st_size, "onnxruntime_ops": ort_ops(Path(f), a.threads)}
                            for k, f in files.items()}
        for runtime in a.runtimes:
            rts = {k: open_runtime(f, runtime, threads=a.threads) for k, f in files.items()}
            config[runtime] = rts["fp32"].config
            for batch in a.batches:
                inp = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
                for rt in rts.values():
                    rt(inp)                               # warm-up
                calls = max(1, (32 if size == 32 else 2) // batch)
                times = interleaved_times({k: (lambda rt=rt: rt(inp)) for k, rt in rts.items()}, a.rounds, calls,
                                          log=False)
                e = {"model": name, "input": size, "batch": batch, "runtime": runtime,
                     **{f"{k}_ms": round(statistics.median(t) * 1e3, 3) for k, t in times.items()},
                     "int8_over_fp32": round(median_ratio(times, "fp32", "tandem_int8_deploy"), 3),
                     "int8_inputs_over_fp32": round(median_ratio(times, "fp32", "tandem_int8_inputs"), 3),
                     "anchor_over_fp32": round(median_ratio(times, "fp32", "ort_quantize_static"), 3),
                     "int8_over_anchor": round(median_ratio(times, "ort_quantize_static", "tandem_int8_deploy"), 3)}
                entries.append(e)
                print(f"{name} {size}px batch {batch} {runtime}: fp32 {e['fp32_ms']:.2f} ms; int8 / fp32: tandem deploy "
                      f"{e['int8_over_fp32']:.2f}, tandem inputs {e['int8_inputs_over_fp32']:.2f}, anchor "
                      f"{e['anchor_over_fp32']:.2f}", flush=True)
    path = write_result("int8_latency" + ("" if a.threads == 1 else f"-{a.threads}threads"), {
        "protocol": f"random-weight models, BN statistics from 3 batches of 32; FP32 = export_onnx of the float "
                    f"model (BN folded); tandem_int8_<layout> = min-max W8A8 every layer, per-channel weights, "
                    f"QDQ, quant.layout deploy (int8_over_fp32) and inputs (int8_inputs_over_fp32); anchor = onnxruntime quantize_static of the FP32 "
                    f"file (QDQ, per-channel QInt8 weights, QUInt8 activations), both calibrated on the same batch. "
                    f"{a.threads} threads; {a.rounds} interleaved rounds; ratio = median over rounds of the "
                    f"per-round ratio in the same runtime. Absolute times vary with the machine's load.",
        "runtime_config": config, "files": files_info, "results": entries})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
