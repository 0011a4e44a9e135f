"""The PEFT adapter folder, read and written in one place (PEFT's ``save_pretrained`` layout).

An adapter folder holds ``adapter_config.json`` (``peft_type`` and the method's hyperparameters) and
``adapter_model.safetensors`` (or ``adapter_model.bin``). Tensor names are the base model's module
names under ``base_model.model.`` followed by the method's parameter name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; DoRA's magnitude is
``<module>.lora_magnitude_vector`` (no ``.weight``), MiSS stores ``<module>.miss_block``, LoKr
``<module>.lokr_w1`` / ``lokr_w1_a`` / ``lokr_w1_b`` / ``lokr_w2`` / ``lokr_w2_a`` / ``lokr_w2_b``. Whole
tensors the adapter trained outright (``bias="all"`` / ``"lora_only"``, ``modules_to_save``) are
stored under the base tensor's own name, a targeted layer's bias as ``<module>.base_layer.bias``; with
``bias="all"`` a ``modules_to_save`` module's biases appear again as ``<module>.modules_to_save.bias`` (the
trained copy) and ``<module>.original_module.bias`` (the base's, which merging drops).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, PlannedTensor, Provenance
from modelsurgery.checkpoint.output import FILES_KEY
from modelsurgery.checkpoint.writer import atomic_path, write_safetensors
from modelsurgery.errors import SurgeryError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A PEFT adapter read from its folder: config, the tensors per targeted module, whole tensors."""

    path: Path
    config: dict
    weights: Checkpoint
    #: module name (as in the base model) -> {parameter name ('lora_A.weight', 'miss_block' ...): adapter key}
    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    #: base tensor name -> adapter key, for tensors the adapter stores whole
    whole: dict[str, str] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def files(self) -> list[Path]:
        return [self.path / CONFIG_NAME, *self.weights.source_files]

    def tensor(self, key: str) -> torch.Tensor:
        return self.weights.get(key).to(torch.float32)

    def parts(self, module: str) -> dict[str, torch.Tensor]:
        return {p: self.tensor(k) for p, k in self.modules[module].items()}


def read_adapter(path: str | Path, parameter_names: Callable[[str], Iterable[str]]) -> Adapter:
    """Read an adapter folder; ``parameter_names(peft_type)`` gives the method's own tensor names (and
    refuses a type it does not know). Any other tensor is a whole tensor of the base model."""
    path = Path(path)
    if not path.is_dir():
        raise SurgeryError(f"{path}: an adapter is a folder with {CONFIG_NAME} and {WEIGHT_NAMES[0]}")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise SurgeryError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{cfg_path}: malformed JSON ({e})") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        raise SurgeryError(f"{cfg_path}: no 'peft_type' (not a PEFT adapter config)")
    names = sorted(parameter_names(str(config["peft_type"])), key=len, reverse=True)  # 'lokr_w1_a' before 'lokr_w1'
    weights_file = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if weights_file is None:
        raise SurgeryError(f"{path}: no {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]}")
    weights = Checkpoint.open(weights_file)
    adapter = Adapter(path, config, weights)
    pattern = re.compile(r"^(.*)\.(" + "|".join(re.escape(n) for n in names) + r")$") if names else None
    for key in weights:
        name = key.removeprefix(PREFIX)
        m = pattern.match(name) if pattern else None
        if m:
            adapter.modules.setdefault(m.group(1), {})[m.group(2)] = key
        elif ".original_module." in name:
            continue  # bias="all" saves the base module a modules_to_save wrapper keeps; merging drops it
        elif ".modules_to_save." in name:  # bias="all" saves the wrapper's trained copy under its inner name too
            adapter.whole.setdefault(name.replace(".modules_to_save.", "."), key)
        else:
            adapter.whole[name.replace(".base_layer.", ".")] = key
    return adapter


def module_key(module: str, parameter: str) -> str:
    return f"{PREFIX}{module}.{parameter}"


def write_lora_adapter(out: Path, tensors: list[PlannedTensor], config: dict, provenance: Provenance,
                       force: bool) -> list[Path]:
    """Write a LoRA adapter folder PEFT loads as it is: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (streamed, provenance in its metadata), atomically."""
    # the files we wrote, as every folder output of ours lists them (what --force may later replace)
    metadata = {"format": "pt", **provenance.to_metadata(), FILES_KEY: json.dumps([CONFIG_NAME, WEIGHT_NAMES[0]])}
    with atomic_path(out, force, is_dir=True) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / WEIGHT_NAMES[0], tensors, metadata)
    return [out / CONFIG_NAME, out / WEIGHT_NAMES[0]]


def lora_config(r: int, alpha: float, target_modules: list[str], rank_pattern: dict[str, int],
                alpha_pattern: dict[str, float], fan_in_fan_out: bool, base: str) -> dict:
    """A LoraConfig as PEFT's ``save_pretrained`` writes it (fields left out take PEFT's defaults)."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": target_modules, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None,
    }


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first key K with ``re.match(rf"(.*\\.)?({K})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
