"""Measured inference latency of a model: what a deploying engineer checks with a stopwatch.

`measure(model, input_size, batch=32)` times the model eager (PyTorch, eval, no grad) and, when
it exports, its ONNX file in onnxruntime, at batch 1 and at `batch`: warm-up calls first, then
`rounds` interleaved rounds (every (runtime, batch) once per round, the order rotating, so a
slow patch of a shared machine hits them alike), each timing enough calls to last about 20 ms;
the figure is the median over rounds. The machine, its CPU flags, the threads and the load
average are recorded with it, since latency means nothing without them.
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """The SIMD flags that decide int8 and bf16 speed (from /proc/cpuinfo; [] where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def _calls_for(fn, target_s: float = 0.02) -> int:
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(1000, round(target_s / once)))


@torch.no_grad()
def measure(model: nn.Module, input_size, batch: int = 32, rounds: int = 5, onnx: bool = True,
            threads: int | None = None) -> dict:
    """{"latency_ms": {"eager": {"1": ms, "<batch>": ms}, "onnxruntime": {...}}, "latency_setup":
    {...}}; onnxruntime is left out (and `latency_setup.onnx_error` says why) when the model
    does not export."""
    model = copy.deepcopy(model).cpu().eval()
    batches = sorted({1, int(batch)})
    inputs = {b: torch.randn(b, *input_size, generator=torch.Generator().manual_seed(0)) for b in batches}
    fns = {("eager", b): (lambda x=x: model(x)) for b, x in inputs.items()}
    setup = {"threads": threads or torch.get_num_threads(), "rounds": rounds, "cpu_flags": cpu_flags(),
             "load_average_1min": round(os.getloadavg()[0], 2)}
    tmp = None
    if onnx:
        try:
            from .export import export_onnx, open_runtime
            tmp = tempfile.TemporaryDirectory()
            rt = open_runtime(export_onnx(model, Path(tmp.name) / "m.onnx", tuple(input_size)).path,
                              "onnxruntime", threads=setup["threads"])
            fns.update({("onnxruntime", b): (lambda x=x.numpy(): rt(x)) for b, x in inputs.items()})
            setup["onnxruntime"] = rt.config
        except Exception as exc:  # an op the exporter or the runtime lacks: eager latency still counts
            setup["onnx_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        calls = {}
        for key, fn in fns.items():
            fn()                                   # warm-up (allocations, onnxruntime's first run)
            calls[key] = _calls_for(fn)
        keys, times = list(fns), {k: [] for k in fns}
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                start = time.perf_counter()
                for _ in range(calls[key]):
                    fns[key]()
                times[key].append((time.perf_counter() - start) / calls[key])
    finally:
        torch.set_num_threads(previous)
        if tmp is not None:
            tmp.cleanup()
    out: dict[str, dict[str, float]] = {}
    for (runtime, b), t in times.items():
        out.setdefault(runtime, {})[str(b)] = round(statistics.median(t) * 1e3, 4)
    return {"latency_ms": out, "latency_setup": setup}
