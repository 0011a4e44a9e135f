"""Step records: what a recipe step was run with, so an unchanged step can be skipped.

A record sits in ``.surgery-run/`` beside the step's output (outside it, so the output itself is
exactly what the operation wrote). It holds the operation, its parameters, the sha256 of every
input file and of every output file (with size and mtime), and the step's result as it ran
(reported again when cached). A step is cached when its record matches the operation and parameters it would run
now, its inputs still hash the same, and its output still hashes as written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from modelsurgery import __version__
from modelsurgery.checkpoint.digests import file_digest

RECORD_DIR = ".surgery-run"


def files_of(path: Path) -> list[Path]:
    """A file, or every file under a folder in sorted order."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.exists() else []


def _relative(path: Path) -> list[tuple[str, Path]]:
    """(name, file) of every file ``path`` stands for: a folder's files; a file, with an ONNX model's external
    data file beside it (``export`` keeps the tensors of a model above 2 GiB in ``OUT.onnx.data``)."""
    path = Path(path)
    if path.is_dir():
        return [(str(p.relative_to(path)), p) for p in files_of(path)]
    data = path.with_name(path.name + ".data")
    return [(p.name, p) for p in (path, data) if p.is_file() and (p == path or path.name.endswith(".onnx"))]


def tree_state(path: Path) -> dict[str, dict]:
    """Relative name -> {sha256, size, mtime_ns} for a file or every file of a folder."""
    out = {}
    for rel, p in _relative(path):
        st = os.stat(p)
        out[rel] = {"sha256": file_digest(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def same_state(recorded: dict, path: Path) -> bool:
    """True when ``path`` holds the files ``recorded`` lists with the same contents. A file whose size and
    mtime are as recorded is taken as unchanged (as git's index does); any other file is hashed again."""
    current = _relative(path)
    if sorted(rel for rel, _ in current) != sorted(recorded):
        return False
    for rel, p in current:
        st, rec = os.stat(p), recorded[rel]
        if (st.st_size, st.st_mtime_ns) == (rec.get("size"), rec.get("mtime_ns")):
            continue
        if st.st_size != rec.get("size") or file_digest(p) != rec.get("sha256"):
            return False
    return True


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in files_of(path))


def record_path(output: Path) -> Path:
    output = Path(output)
    return output.parent / RECORD_DIR / (output.name + ".json")


def make_record(operation: str, parameters: dict, inputs: list[Path], output: Path, result: dict | None = None
                ) -> dict:
    return {
        "result": result,
        "tool": "modelsurgery",
        "version": __version__,
        "operation": operation,
        "parameters": parameters,
        "inputs": [{"path": str(p), "files": tree_state(p)} for p in inputs],
        "output": {"path": str(output), "files": tree_state(output)},
    }


def read_record(output: Path) -> dict | None:
    path = record_path(output)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_cached(operation: str, parameters: dict, inputs: list[Path], output: Path) -> bool:
    """True when ``output`` was written by this operation, with these parameters, from these inputs."""
    rec = read_record(output)
    if rec is None or not Path(output).exists():
        return False
    if rec.get("operation") != operation or rec.get("parameters") != _jsonable(parameters):
        return False
    if rec.get("version") != __version__:
        return False
    if [i.get("path") for i in rec.get("inputs", [])] != [str(p) for p in inputs]:
        return False
    if not all(same_state(i.get("files", {}), p) for i, p in zip(rec["inputs"], inputs)):
        return False
    return same_state(rec.get("output", {}).get("files", {}), output)


def write_record(operation: str, parameters: dict, inputs: list[Path], output: Path, result: dict | None = None
                 ) -> None:
    path = record_path(output)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    record = make_record(operation, _jsonable(parameters), inputs, output, _jsonable(result))
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str, sort_keys=True))
