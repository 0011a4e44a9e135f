"""`export`: a checkpoint (float or packed-quantized) to one ONNX file, proven in ONNX Runtime.

Float checkpoints are traced from the family's module (``family.build_module``). Packed checkpoints
are dequantized, W = (q - z) * s (Jacob et al., 2018, eq. 1), traced the same way, and then their
weights are swapped back to integer codes behind DequantizeLinear nodes (``export.qdq``), so the
file holds the integers and the graph computes the dequantized forward exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from modelsurgery.checkpoint import Checkpoint, check_finite, check_output
from modelsurgery.checkpoint.output import move_into_place, remove_stale_temporaries, temp_name
from modelsurgery.data import TENSOR_SUFFIXES
from modelsurgery.deploy import deployed_state, read_deployed
from modelsurgery.errors import SurgeryError
from modelsurgery.export.ort_check import CheckResult, check_export, op_counts
from modelsurgery.export.packed import METADATA_KEY, PackedWeight, dequantized_state, read_packed
from modelsurgery.export.qdq import BLOCKED_OPSET, FAITHFUL_SESSION_CONFIG, check_opset, insert_dequantize
from modelsurgery.export.trace import trace_module
from modelsurgery.families import Family, detect_family
from modelsurgery.ops.float_input import quantization_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
#: protobuf cannot serialise a message of 2 GiB or more; larger exports keep tensors in OUT.onnx.data
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
DEFAULT_OPSET = 17
MIN_OPSET = 13


DEFAULT_CHECK_SEQ_LEN = 12


@dataclass
class ExportOptions:
    opset: int | None = None  # None: 17, or the smallest opset the packed weights need
    dtype: str = "fp32"
    check: bool = True
    tolerance: float | None = None  # None: DEFAULT_TOLERANCE[dtype]
    model: str | None = None  # custom factory 'package.module:function'
    data: Path | None = None  # sample inputs for the check, read by modelsurgery.data (default: generated)
    samples: int = 4  # check inputs: batch size (first N samples of --data)
    seq_len: int | None = None  # check inputs: tokens per generated sample or --data text line (None: 12); token
    # models only: given for feature inputs or tensor --data, where nothing reads it, it is refused
    seed: int = 0
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    force: bool = False

    @property
    def check_seq_len(self) -> int:
        return DEFAULT_CHECK_SEQ_LEN if self.seq_len is None else self.seq_len


@dataclass
class ExportReport:
    source: str
    output: str
    files: list[str]
    family: str
    dtype: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    file_bytes: int
    external_data: bool
    op_counts: dict[str, int]
    export_seconds: float
    quantization: dict | None = None
    #: session config entries ONNX Runtime needs to run this file faithfully (empty: default options)
    session_config: dict[str, str] = field(default_factory=dict)
    check: CheckResult | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["check"] = self.check.to_dict() if self.check else None
        return d


Progress = Callable[[str, int, int, dict], None]


def _no_progress(task: str, done: int, total: int, info: dict | None = None) -> None:
    pass


def resolve_opset(options: ExportOptions, weights: list[PackedWeight], source: str) -> int:
    half = options.dtype == "fp16"
    if options.opset is None:  # packed weights: opset 21, whose blocked form runs faithfully by default
        return BLOCKED_OPSET if weights else DEFAULT_OPSET
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= options.opset <= newest:
        raise SurgeryError(f"{source}: --opset {options.opset} is outside {MIN_OPSET}..{newest}; nothing was written")
    if weights:
        check_opset(weights, options.opset, half, source)
    return options.opset


def runnable_family(ckpt: Checkpoint, model: str | None, source: str) -> Family:
    family = detect_family(ckpt, model)
    if not family.runnable:
        raise SurgeryError(f"{source}: {family.not_runnable_reason()}")
    return family


def sample_inputs(family: Family, options: ExportOptions, batch: int, seq_len: int, seed: int
                  ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = family.example_inputs(batch=batch, seq_len=seq_len, generator=g)
    dtype = DTYPES[options.dtype]
    names = [n for n in family.input_names() if n in raw] + [n for n in raw if n not in family.input_names()]
    return {n: raw[n].to(dtype) if raw[n].is_floating_point() else raw[n] for n in names}


def check_seq_len_is_read(family: Family, options: ExportOptions, path: Path) -> None:
    """--seq-len cuts generated token samples and --data text lines; for a model of feature inputs, or --data
    tensors (used as stored), nothing would read it: refused rather than ignored."""
    if options.seq_len is None:
        return
    if "input_ids" not in family.input_names():
        raise SurgeryError(f"--seq-len {options.seq_len}: {path} is a {family.name} model of feature inputs, "
                           "not token sequences; nothing reads it")
    if options.data is not None and Path(options.data).suffix.lower() in TENSOR_SUFFIXES:
        raise SurgeryError(f"--seq-len {options.seq_len}: {options.data} holds tensors, which the check uses as "
                           "stored; --seq-len cuts generated samples and text lines")


def check_inputs(family: Family, options: ExportOptions, trace_inputs: dict[str, torch.Tensor], tokenizer: Path
                 ) -> dict[str, torch.Tensor]:
    """Samples for the ONNX Runtime check: the first ``samples`` of ``--data``, else generated in
    another shape than the trace's (which also proves the dynamic axes)."""
    if options.data is None:
        return sample_inputs(family, options, options.samples, options.check_seq_len, options.seed + 1)
    from modelsurgery.data import check_fits, load_data

    text = Path(options.data).suffix.lower() not in TENSOR_SUFFIXES
    data = load_data(options.data, tokenizer=tokenizer if text else None,
                     seq_len=options.check_seq_len if text else None)
    data = data.select(slice(0, options.samples))
    check_fits(family, data)
    dtype = DTYPES[options.dtype]
    inputs = {}
    for name, value in data.model_inputs(family).items():
        if value.is_floating_point():  # features as the graph was traced: [N, 64] digits for a [N, 1, 8, 8] CNN
            value = value.reshape(value.shape[0], *trace_inputs[name].shape[1:]).to(dtype)
        inputs[name] = value
    return inputs


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data (ByteSize() wraps around for a single tensor above 2 GiB)."""
    return (len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data))
            + 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data)))


def save_model(model: onnx.ModelProto, out: Path, threshold: int, force: bool, check: Callable[[Path], None]
               ) -> tuple[list[Path], bool]:
    """Write ``out`` (and ``out.data`` above ``threshold`` bytes) atomically; ``check`` runs on the temporary copy.
    Both files follow the output rules (``checkpoint.output``): no replacement without ``force``, even of a
    file that appeared during the run."""
    parent = out.parent
    data_out = parent / (out.name + ".data")
    remove_stale_temporaries(parent)  # (also done by check_output before the work)
    tmp = temp_name(out)
    os.mkdir(tmp)
    placed: list[Path] = []
    try:
        size = sum(tensor_bytes(i) for i in model.graph.initializer)
        external = size > threshold
        data_name = data_out.name
        onnx.save_model(model, str(tmp / out.name), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(tmp / out.name), full_check=True)
        check(tmp / out.name)
        check_output(out, force, folder=False)
        if external:
            move_into_place(tmp / data_name, data_out, force, tmp / (data_name + ".old"))
            placed.append(data_out)
        elif os.path.lexists(data_out):  # stale external data of a replaced export (refused earlier without force)
            check_output(data_out, force, folder=False)
            os.unlink(data_out)
        move_into_place(tmp / out.name, out, force, tmp / (out.name + ".old"))
        return [out, *placed], external
    except BaseException:
        for p in placed:  # the .onnx did not land: take its new external data back out
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(path: str | Path, out: str | Path, options: ExportOptions | None = None,
                      progress: Progress = _no_progress) -> ExportReport:
    """Export the checkpoint at ``path`` to the ONNX file ``out`` and (by default) check it in ONNX Runtime."""
    options = options or ExportOptions()
    path, out = Path(path), Path(out)
    start = time.perf_counter()
    if out.suffix != ".onnx":
        raise SurgeryError(f"{out}: the output must be a .onnx file")
    if options.dtype not in DTYPES:
        raise SurgeryError(f"--dtype {options.dtype}: expected one of {', '.join(DTYPES)}")
    src = Checkpoint.open(path)
    inputs = [path, src, *([options.data] if options.data is not None else [])]
    check_output(out, options.force, inputs, folder=False)
    check_output(out.parent / (out.name + ".data"), options.force, inputs, folder=False)
    progress("export", 0, 4, {"stage": "read"})
    weights = read_packed(src)
    deployed = None if weights else read_deployed(src)  # a GPTQ or compressed-tensors folder
    weights = weights or deployed or []
    foreign = None if weights else quantization_of(src)
    if foreign is not None and foreign.format == "foreign":  # integer codes under float names (bitsandbytes)
        raise SurgeryError(f"{path}: {foreign.describe()}; export reads float checkpoints, modelsurgery's packed "
                           "ones and GPTQ or compressed-tensors folders; nothing was written")
    opset = resolve_opset(options, weights, str(path))
    dtype = DTYPES[options.dtype]
    view = src
    if weights:
        metadata = {k: v for k, v in src.metadata.items() if k != METADATA_KEY}
        state = deployed_state(src, weights, dtype) if deployed else dequantized_state(src, weights, dtype)
        view = Checkpoint.from_state_dict(state, path=src.path, config=src.config, metadata=metadata)
    family = runnable_family(view, options.model, str(path))
    check_seq_len_is_read(family, options, path)
    limit = family.max_positions()
    if options.check and options.data is None and limit is not None and options.check_seq_len > limit:
        raise SurgeryError(f"--seq-len {options.check_seq_len}: {path} holds positions for {limit} tokens at most")
    module = family.build_module(dtype=dtype)
    for name, param in module.named_parameters():  # a NaN/Inf weight would export and "check" as NaN == NaN
        check_finite(name, param.detach(), path)
    trace_inputs = sample_inputs(family, options, 2, 8, options.seed)
    output_names = family.output_names()
    progress("export", 1, 4, {"stage": "trace"})
    model = trace_module(module, trace_inputs, output_names, opset, keep_batchnorm=bool(weights), source=str(path))
    report_warnings: list[str] = []
    quantization = None
    if weights:
        progress("export", 2, 4, {"stage": "quantize"})
        own = module.state_dict()
        values = {w.name: (own[w.name] if w.name in own else w.dequantize(dtype)).detach().contiguous().numpy()
                  for w in weights}
        stored, left_float = insert_dequantize(model, weights, values, opset)
        if left_float:
            report_warnings.append(
                f"{len(left_float)} quantized weight(s) were not found verbatim in the traced graph and stay float: "
                + ", ".join(left_float[:5]) + (" ..." if len(left_float) > 5 else "")
            )
        quantization = {
            "bits": sorted({w.bits for w in weights}),
            "granularity": sorted({w.granularity for w in weights}),
            "group_sizes": sorted({w.group_size for w in weights if w.group_size}),
            "integer_weights": len(stored),
            "float_weights": left_float,
        }
    session_config = dict(FAITHFUL_SESSION_CONFIG) if weights and opset < BLOCKED_OPSET else {}
    if session_config:
        report_warnings.append(
            f"below opset {BLOCKED_OPSET} ONNX Runtime fuses DequantizeLinear->MatMul and quantizes activations; "
            "run with session config " + ", ".join(f"{k}={v}" for k, v in session_config.items())
            + f" (or export with --opset {BLOCKED_OPSET})"
        )
    tolerance = options.tolerance if options.tolerance is not None else DEFAULT_TOLERANCE[options.dtype]
    result: dict[str, CheckResult] = {}

    def verify(tmp_path: Path) -> None:
        if not options.check:
            return
        progress("export", 3, 4, {"stage": "check"})
        inputs = check_inputs(family, options, trace_inputs, src.folder or path)
        res = check_export(tmp_path, module, inputs, tolerance, session_config)
        if not (math.isfinite(res.max_abs_reference) and math.isfinite(res.max_abs_diff)):
            raise SurgeryError(f"{out}: the model's output holds NaN/Inf on the check inputs; nothing was written "
                               "(--no-check writes it anyway)")
        if not res.passed:
            raise SurgeryError(
                f"{out}: ONNX Runtime differs from torch by {res.max_abs_diff:.3g} (tolerance {tolerance:g}); "
                "nothing was written (raise --tolerance, or --no-check to write it anyway)"
            )
        result["check"] = res

    progress("export", 2, 4, {"stage": "save"})
    files, external = save_model(model, out, options.external_data_threshold, options.force, verify)
    counts = op_counts(out)  # a read of the saved graph: before the bar says done
    progress("export", 4, 4, {"stage": "done"})
    return ExportReport(
        source=str(path), output=str(out), files=[str(f) for f in files], family=family.name,
        dtype=options.dtype, opset=opset, inputs=list(trace_inputs), outputs=output_names,
        file_bytes=sum(f.stat().st_size for f in files), external_data=external, op_counts=counts,
        export_seconds=time.perf_counter() - start, quantization=quantization, session_config=session_config,
        check=result.get("check"),
        warnings=report_warnings,
    )
