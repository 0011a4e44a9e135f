"""The files of a model folder that an output folder carries along beside its new weights: tokenizer,
generation config, and sub-folders such as sentence-transformers' ``1_Pooling/`` and ``2_Dense/``
(the modules listed in ``modules.json``).

What is carried: regular files that resolve inside the folder (a hub snapshot's files are links into
its cache folder, so inside that). Links that point elsewhere, links to folders, FIFOs and devices are
skipped with a ``SurgeryWarning``; hidden entries (``.git/``, ``.cache/``) inside sub-folders and hidden
sub-folders are skipped silently. A sub-folder is never carried when it holds the weights being
rewritten, nor when it holds weight files that ``modules.json`` does not list as a module of their own
(``onnx/``, ``openvino/``, ``checkpoint-500/``: copies of the model the output replaces, stale after it).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modelsurgery.errors import SurgeryError, SurgeryWarning

#: names of weight files at the top level, which the output's own weights replace
TOP_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".pt", ".pth", ".bin", ".ckpt")
#: weight files in a sub-folder (exported copies of a model as well as checkpoints)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".onnx_data", ".onnx.data", ".gguf",
                   ".h5", ".msgpack", ".ot", ".tflite")


@dataclass(frozen=True)
class CarriedFile:
    """One file to copy into an output folder: ``source`` on disk, ``name`` its path in the output
    relative to the folder ("tokenizer.json", "1_Pooling/config.json"; always "/"-separated)."""

    source: Path
    name: str

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if self.name.startswith("/") or any(x in ("", ".", "..") for x in parts):
            raise SurgeryError(f"{self.source}: cannot carry it as '{self.name}': not a path inside the output folder")

    def __fspath__(self) -> str:
        return os.fspath(self.source)

    def __str__(self) -> str:
        return str(self.source)


def carried_files(folder: Path, weights: Iterable[Path], root: Path) -> list[CarriedFile]:
    """The files of model folder ``folder`` to carry into an output; ``weights`` are the files the
    output replaces (never carried), ``root`` the folder links may point into."""
    weights = {Path(w).resolve() for w in weights}
    modules = _module_folders(folder)
    out = []
    for p in sorted(folder.iterdir()):
        if p.name == "config.json" or p.resolve() in weights:
            continue
        if p.is_dir():
            out += _sub_folder(p, weights, modules, root)
            continue
        if p.name.endswith(TOP_WEIGHT_SUFFIXES) or not _acceptable(p, root):
            continue
        out.append(CarriedFile(p, p.name))
    return out


def _module_folders(folder: Path) -> set[str]:
    """Sub-folder names that sentence-transformers' ``modules.json`` lists as modules ("1_Pooling")."""
    try:
        listed = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(listed, list):
        return set()
    paths = (m.get("path") for m in listed if isinstance(m, dict))
    return {p.strip("/").split("/")[0] for p in paths if isinstance(p, str) and p.strip("/")}


def _sub_folder(top: Path, weights: set[Path], modules: set[str], root: Path) -> list[CarriedFile]:
    if top.name.startswith("."):
        return []
    if top.is_symlink() and root not in top.resolve().parents:
        _skip(top, "a link to a folder outside the checkpoint folder")
        return []
    files = []
    _walk(top, top.name, root, files)
    held = [f for f in files if f.source.resolve() in weights]
    if held:
        _skip(top, f"it holds {held[0].name}, a weight file of the model this output rewrites")
        return []
    copies = [f for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
    if copies and top.name not in modules:
        _skip(top, f"it holds weight files ({copies[0].name}) of a model this output may replace and "
              "modules.json does not list it as a module (copy it yourself if it still applies)")
        return []
    return files


def _walk(folder: Path, name: str, root: Path, out: list[CarriedFile]) -> None:
    """Regular files under ``folder`` (links to files inside ``root`` included; links to folders are
    not followed below the sub-folder itself, so no loop and no escape)."""
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() and p.is_dir():
            _skip(p, "a link to a folder (not followed)")
        elif p.is_dir():
            _walk(p, f"{name}/{p.name}", root, out)
        elif _acceptable(p, root):
            out.append(CarriedFile(p, f"{name}/{p.name}"))


def _acceptable(p: Path, root: Path) -> bool:
    if p.is_symlink() and root not in p.resolve().parents:
        _skip(p, "a link to a file outside the checkpoint folder")
        return False
    if not p.is_file():
        _skip(p, "not a regular file")
        return False
    return True


def _skip(p: Path, why: str) -> None:
    warnings.warn(SurgeryWarning(f"{p}: not carried into the output: {why}"), stacklevel=2)
