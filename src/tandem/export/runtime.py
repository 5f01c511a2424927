"""Run an exported ONNX file in an inference runtime: onnxruntime or OpenVINO.

`open_runtime(path, "openvino")` returns a `Runtime`: `rt(x)` is the logits of a float32
NCHW batch, `rt.config` says how it was set up (recorded next to every check and timing). The
settings that decide what runs are set explicitly, never left to the defaults:

- onnxruntime: CPUExecutionProvider, all graph optimisations (its default, so what a user
  gets), intra-op threads.
- OpenVINO: CPU device, `INFERENCE_PRECISION_HINT` f32 (its CPU default on this machine is
  bf16, which would change the float layers' arithmetic; the int8 parts of a QDQ file run in
  int8 either way), `PERFORMANCE_HINT` LATENCY, `INFERENCE_NUM_THREADS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import TandemError

RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class Runtime:
    name: str
    run: Callable[[np.ndarray], np.ndarray]
    config: dict = field(default_factory=dict)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x, dtype=np.float32))


def open_runtime(path, runtime: str = "onnxruntime", threads: int | None = None,
                 precision: str = "f32") -> Runtime:
    if runtime == "onnxruntime":
        from .onnx import ort_session
        sess = ort_session(path, threads)
        return Runtime("onnxruntime", lambda x: sess.run(None, {"input": x})[0],
                       {"version": _version("onnxruntime"), "provider": "CPUExecutionProvider",
                        "graph_optimization": "all", "intra_op_threads": threads or "default"})
    if runtime == "openvino":
        try:
            import openvino as ov
        except ImportError:
            raise TandemError("runtime 'openvino' needs the openvino package: pip install 'tandem[openvino]' "
                              "(or pip install openvino)") from None
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()

        def run(x):
            return request.infer({0: x})[compiled.output(0)].copy()
        return Runtime("openvino", run, {"version": ov.__version__, "device": "CPU", **config})
    raise TandemError(f"unknown runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)
