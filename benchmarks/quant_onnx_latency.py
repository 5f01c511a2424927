"""CPU inference latency in onnxruntime: int8 QDQ ONNX of ResNet-20 against its FP ONNX.

Both files come from tandem.export.export_onnx (the FP model with BN folded by the same
pass). Latency is measured side by side: interleaved rounds, each timing every model for a
few runs, median over rounds; ratio = int8 / FP of the same round. Also records which
operators onnxruntime actually ran after its graph optimisations (QLinearConv or not).

    python benchmarks/quant_onnx_latency.py --threads 1 --rounds 9
"""
from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from common import interleaved_times, median_ratio, write_result
from tandem.export import export_onnx
from tandem.models import create_model
from tandem.quant import calibrate, quantize_


def session(path, threads, optimized_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.optimized_model_filepath = str(optimized_path)
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized_path)).graph.node)
    return s, dict(ops.most_common(8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    fp = create_model("resnet20", num_classes=10)
    fp.train()
    for _ in range(3):
        fp(x)                        # non-trivial BN statistics
    fp.eval()
    models = {"fp32": fp}
    for method, bits in (("minmax", 8), ("lsq", 4)):
        q = quantize_(create_model("resnet20", num_classes=10), method=method, w_bits=bits, a_bits=bits,
                      per_channel=True, first_last="same" if method == "minmax" else 8)
        q.load_state_dict(fp.state_dict(), strict=False)
        calibrate(q, [x])
        models[f"int8-{method}-w{bits}a{bits}"] = q.eval()
    tmp = Path(tempfile.mkdtemp())
    sessions, info = {}, {}
    for name, m in models.items():
        rep = export_onnx(m, tmp / f"{name}.onnx", (3, 32, 32))
        sessions[name], ops = session(rep.path, a.threads, tmp / f"{name}.opt.onnx")
        info[name] = {"bytes": rep.bytes, "ops_after_ort_optimisation": ops, "bn_folded": rep.bn_folded}
    results = {}
    for batch in a.batches:
        inp = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        runs = max(1, 64 // batch)
        for s in sessions.values():
            s.run(None, {"input": inp})
        times = interleaved_times({n: (lambda s=s: s.run(None, {"input": inp})) for n, s in sessions.items()},
                                  a.rounds, runs, log=False)
        results[f"batch{batch}"] = {n: {"median_ms": round(statistics.median(t) * 1e3, 3),
                                        "ratio_to_fp32": round(median_ratio(times, "fp32", n), 3)}
                                    for n, t in times.items()}
        print(batch, results[f"batch{batch}"], flush=True)
    path = write_result("quant_onnx_latency-resnet20-cpu", {
        "protocol": f"ResNet-20 (random weights, BN statistics from 3 batches), 3x32x32, onnxruntime "
                    f"{ort.__version__} CPUExecutionProvider, intra-op threads {a.threads}, default graph "
                    f"optimisation; {a.rounds} interleaved rounds, each timing every model for max(1, 64/batch) "
                    f"runs; ratio = median over rounds of int8/FP of the same round. int8 models: min-max W8A8 "
                    f"(every layer) and LSQ W4A4 (first/last 8-bit), per-channel weights, int8 QDQ. Absolute times "
                    f"vary with the machine's load; the ratios are the result.",
        "models": info, "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
