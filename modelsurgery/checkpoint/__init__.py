"""Checkpoint I/O used by every command: lazy reading, streaming atomic writing, provenance.

Reading a checkpoint's headers needs no torch (``formats``, ``store``, ``output``); the writer
(``writer``) does, so its names are imported from it on first use (PEP 562): ``surgery inspect``
and family detection import this package without torch.
"""

from modelsurgery.checkpoint.formats import TensorInfo, check_finite, read_safetensors_header
from modelsurgery.checkpoint.output import atomic_path, check_output
from modelsurgery.checkpoint.store import Checkpoint, open_checkpoint

#: names of ``checkpoint.writer`` (which imports torch), resolved when first used
_WRITER_NAMES = ("DEFAULT_MAX_SHARD", "PlannedTensor", "Provenance", "WriteReport", "parse_size", "plan_copy",
                 "plan_tensor", "write_checkpoint")


def __getattr__(name: str):
    if name in _WRITER_NAMES:
        from modelsurgery.checkpoint import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
