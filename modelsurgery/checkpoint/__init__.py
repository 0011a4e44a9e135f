"""Checkpoint I/O used by every command: lazy reading, streaming atomic writing, provenance."""

from modelsurgery.checkpoint.formats import TensorInfo, check_finite, read_safetensors_header
from modelsurgery.checkpoint.output import atomic_path, check_output
from modelsurgery.checkpoint.store import Checkpoint, open_checkpoint
from modelsurgery.checkpoint.writer import (
    DEFAULT_MAX_SHARD,
    PlannedTensor,
    Provenance,
    WriteReport,
    parse_size,
    plan_copy,
    plan_tensor,
    write_checkpoint,
)

__all__ = [
    "DEFAULT_MAX_SHARD",
    "Checkpoint",
    "PlannedTensor",
    "Provenance",
    "TensorInfo",
    "WriteReport",
    "atomic_path",
    "check_finite",
    "check_output",
    "open_checkpoint",
    "parse_size",
    "plan_copy",
    "plan_tensor",
    "read_safetensors_header",
    "write_checkpoint",
]
