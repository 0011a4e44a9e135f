"""Run an exported ONNX file in ONNX Runtime and compare it with the torch forward.

The session uses ONNX Runtime's default options (all graph optimisations on, CPU provider) plus
only the session entries the export reports as required: the check proves the file as a deploying
user will run it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from modelsurgery.errors import SurgeryError


@dataclass
class CheckResult:
    max_abs_diff: float
    max_abs_reference: float
    tolerance: float
    passed: bool
    input_shapes: dict[str, list[int]]
    ort_seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def ort_session(path: Path, config: dict[str, str] | None = None):
    """An ONNX Runtime CPU session with default options plus the session ``config`` entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise SurgeryError(f"{path}: ONNX Runtime cannot load the export ({e})") from e


def op_counts(path: Path) -> dict[str, int]:
    """Node types of the saved graph and how often each occurs (external data not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def check_export(path: Path, module: torch.nn.Module, inputs: dict[str, torch.Tensor], tolerance: float,
                 session_config: dict[str, str] | None = None) -> CheckResult:
    """Max |ORT - torch| over the outputs of ``module`` on ``inputs``."""
    session = ort_session(path, session_config)
    feeds = {}
    for meta in session.get_inputs():
        if meta.name not in inputs:
            raise SurgeryError(f"{path}: the export expects input '{meta.name}', no sample was given for it")
        feeds[meta.name] = inputs[meta.name].numpy()
    start = time.perf_counter()
    got = session.run(None, feeds)[0]
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = module(**inputs).float().numpy()
    if got.shape != ref.shape:
        raise SurgeryError(f"{path}: ONNX Runtime output has shape {got.shape}, torch gives {ref.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    return CheckResult(
        max_abs_diff=diff, max_abs_reference=float(np.max(np.abs(ref))) if ref.size else 0.0,
        tolerance=tolerance, passed=bool(diff <= tolerance),
        input_shapes={k: list(v.shape) for k, v in feeds.items()}, ort_seconds=seconds,
    )
