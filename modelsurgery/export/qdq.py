"""Integer weights in an ONNX graph: DequantizeLinear in front of the matmuls (ONNX QDQ format).

A float graph exported from the dequantized module holds each quantized weight W = (q - z) * s
as a float initializer: as the [rows, R] matrix of codes (Gemm), reshaped (a Conv kernel), or
transposed (the exporter's constant-folded MatMul form, GPT-2's Conv1D). Each one is found by its exact bytes and
replaced by the integer codes, their scales and zero points, and a DequantizeLinear node
(per tensor, per axis since opset 13, blocked since opset 21 with uint4 storage since opset 21).
Symmetric weights (zero point 2^(bits-1)) are stored as signed codes (int8/int4) without a zero point.

Graph form. ONNX Runtime's default optimisations fuse DequantizeLinear -> MatMul into its
MatMulNBits kernel, which at the default accuracy level also quantizes the activations to int8
(outputs move by ~0.1 on small models). Its transpose optimiser pushes a Transpose through a
per-axis or per-tensor DequantizeLinear, so a per-channel weight followed by a Transpose still ends
up fused. It does not do that with a blocked DequantizeLinear: from opset 21 every weight is
therefore written as blocks along its [out, R] rows (block = group size, or R for per-channel and
per-tensor scales repeated per row), followed by a Transpose for MatMul inputs. That form is never
fused, and default session options compute exactly float(W) @ x, as the torch forward of the
dequantized checkpoint does. Below opset 21 (8-bit per-channel or per-tensor) the fusion cannot be
prevented by the graph; a faithful session sets ``FAITHFUL_SESSION_CONFIG``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelsurgery.errors import SurgeryError
from modelsurgery.export.packed import PackedWeight

#: blocked DequantizeLinear and 4-bit storage
BLOCKED_OPSET = 21
#: session entries that keep ONNX Runtime's fused 4/8-bit matmul in float (accuracy level 0 = fp32)
FAITHFUL_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def required_opset(weights: list[PackedWeight], half: bool) -> tuple[int, str]:
    """The smallest opset that stores these weights, and why."""
    need, why = 13, "per-channel DequantizeLinear"
    if half:
        need, why = 19, "float16 scales in DequantizeLinear"
    if any(w.bits < 8 for w in weights):
        need, why = BLOCKED_OPSET, f"{min(w.bits for w in weights)}-bit weights (uint4 storage)"
    elif any(w.granularity == "group" for w in weights):
        need, why = BLOCKED_OPSET, "per-group (blocked) DequantizeLinear"
    return need, why


def pack_uint4(codes: np.ndarray) -> bytes:
    """ONNX uint4 raw data: the flattened tensor two per byte, first element in the low nibble."""
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def integer_tensor(name: str, codes: np.ndarray, bits: int, signed: bool = False) -> onnx.TensorProto:
    """uint8/int8, or uint4/int4 (two's complement nibbles) for 4 bits and fewer."""
    if bits <= 4:
        kind = TensorProto.INT4 if signed else TensorProto.UINT4
        return helper.make_tensor(name, kind, codes.shape, pack_uint4(codes.astype(np.int16) & 0xF), raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(codes, dtype=np.int8 if signed else np.uint8), name)


def symmetric(w: PackedWeight) -> bool:
    """Zero point 2^(bits-1) everywhere: stored as signed codes q - 2^(bits-1) with no zero point
    (int4/int8), which saves the zero-point tensor."""
    return bool(np.all(w.zero_point == 1 << (w.bits - 1)))


@dataclass
class Replacement:
    initializer: str
    weight: str
    #: how the initializer relates to the [rows, R] matrix DequantizeLinear yields:
    #: "rows" (the same), "transposed" (2-D, [R, rows]), "reshaped" (a conv kernel [out, in, *k])
    orientation: str


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def find_weight_initializers(model: onnx.ModelProto, matrices: dict[str, np.ndarray],
                             shapes: dict[str, tuple[int, ...]]) -> list[Replacement]:
    """Initializers holding exactly one of ``matrices`` (weight name -> [rows, R] values as the module
    holds them), as is, transposed, or reshaped to the weight's stored ``shapes``."""
    wanted: dict[tuple[tuple[int, ...], str], tuple[str, str]] = {}
    for name, m in matrices.items():
        wanted.setdefault((tuple(m.shape), _digest(m)), (name, "rows"))
        wanted.setdefault((tuple(m.T.shape), _digest(m.T)), (name, "transposed"))
        if len(shapes[name]) != 2:
            wanted.setdefault((tuple(shapes[name]), _digest(m)), (name, "reshaped"))  # same bytes, other dims
    dims_wanted = {s for s, _ in wanted}
    found = []
    for init in model.graph.initializer:
        dims = tuple(init.dims)
        if dims not in dims_wanted:
            continue
        hit = wanted.get((dims, _digest(numpy_helper.to_array(init))))
        if hit is not None:
            found.append(Replacement(init.name, hit[0], hit[1]))
    return found


def insert_dequantize(model: onnx.ModelProto, weights: list[PackedWeight], values: dict[str, np.ndarray],
                      opset: int) -> tuple[list[str], list[str]]:
    """Replace float initializers of ``weights`` by integer codes + DequantizeLinear, in place.

    Returns (weights stored as integers, weights left as float because the graph did not hold them
    verbatim, e.g. folded into another constant).
    """
    by_name = {w.name: w for w in weights}
    matrices = {w.name: (values[w.name].T if w.transposed else values[w.name].reshape(w.rows, w.row_length))
                for w in weights}
    replacements = find_weight_initializers(model, matrices, {w.name: w.shape for w in weights})
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, new_inits, done = [], [], []
    for r in replacements:
        w = by_name[r.weight]
        base = f"{r.initializer}_quant"
        scale, zp = w.scale, w.zero_point
        if opset >= BLOCKED_OPSET:  # every granularity as blocks along the row: see the module docstring
            if scale.shape[0] != w.rows:
                scale, zp = np.repeat(scale, w.rows, axis=0), np.repeat(zp, w.rows, axis=0)
            attrs = {"axis": 1, "block_size": int(w.group_size or w.row_length)}
        elif w.granularity == "tensor":
            scale, zp, attrs = scale.reshape(()), zp.reshape(()), {}
        elif w.granularity == "channel":
            scale, zp, attrs = scale.reshape(-1), zp.reshape(-1), {"axis": 0}
        else:
            raise SurgeryError(f"{w.name}: per-group DequantizeLinear needs opset {BLOCKED_OPSET}")
        dq_inputs = [f"{base}.q", f"{base}.scale"]
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale, dtype=values[w.name].dtype),
                                                 f"{base}.scale"))
        if symmetric(w):
            new_inits.append(integer_tensor(f"{base}.q", w.codes.astype(np.int16) - (1 << (w.bits - 1)), w.bits,
                                            signed=True))
        else:
            new_inits += [integer_tensor(f"{base}.q", w.codes, w.bits),
                          integer_tensor(f"{base}.zero_point", zp, w.bits)]
            dq_inputs.append(f"{base}.zero_point")
        target = list(inits[r.initializer].dims)
        direct = r.orientation == "rows"
        dq_out = r.initializer if direct else f"{base}.dq"
        new_nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [dq_out], name=f"{base}.DequantizeLinear",
                                          **attrs))
        if r.orientation == "transposed":
            new_nodes.append(helper.make_node("Transpose", [dq_out], [r.initializer], perm=[1, 0],
                                              name=f"{base}.Transpose"))
        elif not direct:
            new_inits.append(numpy_helper.from_array(np.array(target, np.int64), f"{base}.shape"))
            new_nodes.append(helper.make_node("Reshape", [dq_out, f"{base}.shape"], [r.initializer],
                                              name=f"{base}.Reshape"))
        done.append(w.name)
    replaced = {r.initializer for r in replacements}
    kept = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    inputs = [i for i in graph.input if i.name not in replaced]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    done = list(dict.fromkeys(done))
    return done, [w.name for w in weights if w.name not in set(done)]


def check_opset(weights: list[PackedWeight], opset: int, half: bool, source: str) -> None:
    need, why = required_opset(weights, half)
    if opset < need:
        raise SurgeryError(f"{source}: {why} need --opset {need} or newer (got {opset}); nothing was written")
