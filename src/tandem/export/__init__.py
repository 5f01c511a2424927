"""Export: int8 QDQ ONNX that onnxruntime runs, and safetensors with bit-packed weights.

    from tandem.export import export_onnx, fold_bn, onnx_agreement, save_packed, load_packed
    export_onnx(model, "model.onnx", input_shape=(1, 28, 28))
    fast = fold_bn(model)    # eager inference with BN folded into the convs
    save_packed(model, "model.packed.safetensors"); model2 = load_packed("model.packed.safetensors")

`export_run(run_dir, "onnx" | "safetensors")` is `tandem export`: every model of a run folder,
each checked against the PyTorch model on the test set.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import TandemError
from .fold import fold_bn
from .onnx import OnnxExport, export_onnx, int_grid, onnx_agreement, ort_session
from .runtime import RUNTIMES, Runtime, open_runtime
from .packed import load_packed, pack_bits, save_packed, unpack_bits

FORMATS = ("onnx", "safetensors")
PARITY_MIN = 99.0   # % of test images on which onnxruntime must predict what PyTorch predicts
RECORD = ("dataset", "seed", "mean", "std", "input_size")   # what a packed file keeps of its model file's record


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _test_data(meta: dict, data_root, cache: dict):
    from ..data import BatchLoader, dataset_of
    key = json.dumps([meta.get("dataset"), meta.get("seed"), data_root], sort_keys=True)
    if key not in cache:
        data = dataset_of(meta, data_root)
        cache[key] = (data, BatchLoader(data.test, 1024, mean=data.mean, std=data.std, device="cpu"))
    return cache[key]


def export_run(target, fmt: str, out_dir=None, data_root=None, log=print, allow_mismatch: bool = False,
               warn=None, runtime: str = "onnxruntime", factory: str | None = None) -> list[dict]:
    """Export every model of a run folder (or one model file); returns one summary per model,
    also written to <out>/export-<fmt>.json
    (export-onnx-openvino.json for an OpenVINO check). An ONNX file whose predictions agree with PyTorch's
    (run in `runtime`: onnxruntime or openvino) on fewer than PARITY_MIN % of the test images is removed (kept with `allow_mismatch`) and its
    row says `parity: false`; `warn` (default: stderr) gets one line per such model."""
    import torch
    from .. import cost
    from ..engine import load_model

    if fmt not in FORMATS:
        raise TandemError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if runtime not in RUNTIMES:
        raise TandemError(f"unknown runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    if runtime != "onnxruntime" and fmt != "onnx":
        raise TandemError(f"--runtime {runtime} checks ONNX files; --format {fmt} is checked in PyTorch")
    target = Path(target)
    files = sorted((target / "models").glob("*.safetensors")) if target.is_dir() else [target]
    if not files or not files[0].exists():
        raise TandemError(f"no model files (*.safetensors) in {target / 'models' if target.is_dir() else target}")
    out = Path(out_dir) if out_dir else (target if target.is_dir() else target.parent.parent) / "export"
    cache, rows = {}, []
    for path in files:
        model, meta = load_model(path, factory=factory)
        model.eval()
        data, loader = _test_data(meta, data_root, cache)
        shape = (data.in_channels, *data.image_size)
        if fmt == "onnx":
            rep = export_onnx(model, out / f"{path.stem}.onnx", shape)
            check = onnx_agreement(model, rep.path, loader, runtime)
            parity = check["agreement"] >= PARITY_MIN
            row = {"model": path.stem, "file": rep.path, "bytes": rep.bytes, "int8_weight_layers": len(rep.int8_weights),
                   "float_weight_layers": rep.float_weights, "qdq_input_layers": len(rep.qdq_inputs),
                   "bn_folded": rep.bn_folded, "notes": rep.notes, **check, "parity": parity}
            log(f"{path.stem}: {rep.path} ({rep.bytes:,} bytes; int8 weights in {len(rep.int8_weights)} layers, "
                f"QDQ inputs in {len(rep.qdq_inputs)}); {runtime} top-1 {check['top1_onnx']:.2f}% vs PyTorch "
                f"{check['top1_torch']:.2f}%, same prediction on {check['agreement']:.2f}% of {check['n']} test images")
            if not parity:
                if not allow_mismatch:
                    Path(rep.path).unlink()
                    row["file"] = None
                (warn or _stderr)(f"{path.stem}: MISMATCH: {runtime} predicts what PyTorch predicts on only "
                    f"{check['agreement']:.2f}% of the test images (< {PARITY_MIN:g}%); "
                    + ("file kept (--allow-mismatch)" if allow_mismatch else
                       "file removed (--allow-mismatch keeps it)"))
        else:
            file = out / f"{path.stem}.packed.safetensors"
            info = save_packed(model, file, **{k: meta[k] for k in RECORD if k in meta})
            back = load_packed(file).eval()
            x = next(iter(loader))[0][:256]
            with torch.no_grad():
                diff = float((model(x) - back(x)).abs().max())
            expected = cost.profile(model, shape).bytes
            row = {"model": path.stem, **info, "cost_bytes": expected, "ratio_to_cost_bytes": info["bytes"] / expected,
                   "reload_max_logit_diff": diff}
            log(f"{path.stem}: {file} ({info['bytes']:,} bytes; weights at their bits + float params = "
                f"{expected:,} bytes); reloaded model max |logit diff| {diff:.2e}")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    name = f"export-{fmt}" + ("" if runtime == "onnxruntime" else f"-{runtime}")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


__all__ = ["PARITY_MIN", "RUNTIMES", "Runtime", "open_runtime", "export_onnx", "onnx_agreement", "ort_session", "OnnxExport", "int_grid", "save_packed", "load_packed",
           "pack_bits", "unpack_bits", "export_run", "FORMATS"]
