"""The config.json of the models a merge combines: same shapes do not mean the same function.

Two LLaMA-shaped folders can agree in every tensor shape and still compute differently: 8 heads of 64 or 16
of 32 (head_dim set apart from hidden_size), another activation, other sliding layers. The
average of their weights is then no model at all. Each family declares which config.json keys change its
function (``Family.structural_config_keys``, refused when they differ) and which are numeric settings that
fine-tunes of one model differ in on purpose (``Family.tuning_config_keys``: rope base and scaling, context
length, norm epsilon, window size; reported, and the output carries the first model's value). Values are
compared as the family computes with them (``Family.config_value``), so a key left out equals its default and
transformers 4.x's ``rope_theta`` equals 5.x's ``rope_parameters`` with the same base.

mergekit checks only that the architecture class names agree (``get_architecture_info``) and writes the base
model's config.json, else the first model's (``_model_out_config``), whatever the others say.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families.base import Family


@dataclass
class ConfigDifference:
    """A tuning key whose value differs between the merged models: config.json file -> value."""

    key: str
    values: dict[str, Any]

    def note(self, carried: str) -> str:
        shown = ", ".join(f"{_show(v)} ({f})" for f, v in self.values.items())
        return (f"config.json {self.key} differs between the merged models: {shown}; the output carries "
                f"{_show(self.values.get(carried))} from {carried}")


def config_file(ckpt: Checkpoint) -> str:
    """Where a checkpoint's config.json is (its folder's), for messages."""
    return str(ckpt.folder / "config.json") if ckpt.folder is not None else str(ckpt.path)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list, tuple)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or a == b


def compare_configs(models: Sequence[tuple[Checkpoint, Family]], skip: Collection[str] = ()) -> list[ConfigDifference]:
    """Refuse (one line naming both config.json files, the key and both values) a structural key whose value
    differs between the first model with a config.json and another; return the tuning keys that differ. Models
    without config.json have nothing to compare. ``skip``: keys the caller checks itself (per-layer lists that
    mergekit slices take layer by layer)."""
    found = [(c, f) for c, f in models if c.config]
    if len(found) < 2:
        return []
    (first, first_family), others = found[0], found[1:]
    structural = dict.fromkeys(k for _, f in found for k in f.structural_config_keys if k not in skip)
    for key in structural:
        ref = first_family.config_value(key)
        for ckpt, family in others:
            value = family.config_value(key)
            if not _same(value, ref):
                raise SurgeryError(
                    f"{config_file(ckpt)}: config.json {key}={_show(value)}, but {config_file(first)} has "
                    f"{key}={_show(ref)}: weights of the same shapes compute another function under each, so "
                    "their merge is meaningless")
    differences = []
    for key in dict.fromkeys(k for _, f in found for k in f.tuning_config_keys if k not in skip):
        values = {config_file(c): f.config_value(key) for c, f in found}
        if any(not _same(v, values[config_file(first)]) for v in values.values()):
            differences.append(ConfigDifference(key, values))
    return differences
