"""User-defined models: ``--model package.module:function`` names a factory returning an ``nn.Module``.

The factory is called with no arguments, or with the checkpoint's config.json dict when it takes
one parameter. The checkpoint must fit the module strictly (same tensor names and shapes, nothing
left over); the first missing, unexpected or mismatched tensor is named. The fit is checked when the
family is created, by building the module on the meta device (no memory, no data read).

Inputs: the module's ``forward`` parameters name them. ``example_inputs`` uses the module's
``example_input_shape`` attribute (per-sample shape) when present, else the first layer: Linear ->
[N, in_features], Conv1d/2d/3d -> [N, C, 8, ...], Embedding -> token ids [N, seq_len].
``stages()``: the module's own when it defines one, else its top-level children as blocks (right for
``nn.Sequential`` and any module whose forward runs its children in order).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Family, Linear, Stages

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_SPATIAL = 8


#: where --model looks for its factory (said in every command's --help)
MODEL_HELP = ("Custom model factory 'package.module:function' (imported from the current folder first, "
              "then the Python path, as `python -m` does) or 'path/to/file.py:function'.")


def factory_file(spec: str) -> Path | None:
    """The file ``load_factory`` would import for ``spec`` when it is the user's own: 'path/to/file.py:fn',
    or 'package.module:fn' found in the current folder (a module elsewhere on the Python path is installed
    code); None otherwise, and for a spec ``load_factory`` refuses."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        return None
    if mod_name.endswith(".py"):
        candidates = [Path(mod_name)]
    else:
        base = Path(*mod_name.split("."))
        candidates = [base.with_suffix(".py"), base / "__init__.py"]
    return next((c for c in candidates if c.is_file()), None)


def load_factory(spec: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function (SurgeryError naming
    what is missing). A module name is looked up in the current folder first, then on the Python path."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise SurgeryError(f"--model '{spec}': expected 'package.module:function' or 'path/to/file.py:function'")
    try:
        module = _import_file(spec, Path(mod_name)) if mod_name.endswith(".py") else _import_module(mod_name)
    except SurgeryError:
        raise
    except ModuleNotFoundError as e:
        raise SurgeryError(f"--model '{spec}': cannot import module '{mod_name}' ({e}; looked in {Path.cwd()} "
                           "and on the Python path)") from e
    except Exception as e:  # the user's module failed while importing
        raise SurgeryError(f"--model '{spec}': importing '{mod_name}' failed ({type(e).__name__}: {e})") from e
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise SurgeryError(f"--model '{spec}': module '{mod_name}' has no function '{fn_name}'")
    return fn


def _import_module(name: str) -> types.ModuleType:
    # `python -m` and a plain `python` put the current folder first on the path; a console script
    # does not, so a package next to the user would not be found without this
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_file(spec: str, path: Path) -> types.ModuleType:
    if not path.is_file():
        raise SurgeryError(f"--model '{spec}': {path}: no such file")
    name = f"_surgery_model_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the file's own imports of its neighbours
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


def _sequential_stages(module: nn.Module) -> Stages:
    return Stages(embed=lambda **inputs: (next(iter(inputs.values())), {}), blocks=list(module.children()),
                  head=lambda h: h)


@register
class CustomFamily(Family):
    name = "custom"
    priority = -100

    def __init__(self, ckpt: Checkpoint, model: str):
        super().__init__(ckpt)
        self.spec = model
        self.factory = load_factory(model)
        self._check_fit(self._instantiate(meta=True))

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return False  # only ever chosen explicitly with --model

    def _instantiate(self, meta: bool = False) -> nn.Module:
        """The factory's module (on the meta device when ``meta`` and the factory allows it)."""
        import torch

        try:
            takes_config = len([p for p in inspect.signature(self.factory).parameters.values()
                                if p.default is inspect.Parameter.empty
                                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 1
        except (TypeError, ValueError):
            takes_config = False
        args = (self.config,) if takes_config else ()
        try:
            if meta:
                try:
                    with torch.device("meta"):
                        module = self.factory(*args)
                except Exception:  # some factories cannot run on meta tensors; build for real
                    module = self.factory(*args)
            else:
                module = self.factory(*args)
        except Exception as e:
            raise SurgeryError(f"--model '{self.spec}': the factory failed ({type(e).__name__}: {e})") from e
        if not isinstance(module, torch.nn.Module):
            raise SurgeryError(f"--model '{self.spec}': the factory returned {type(module).__name__}, not an nn.Module")
        return module

    def _check_fit(self, module: nn.Module) -> None:
        own = module.state_dict()
        for k, v in own.items():
            if k not in self.ckpt:
                raise SurgeryError(f"{self.ckpt.path}: tensor '{k}' needed by --model {self.spec} is missing")
            if tuple(self.ckpt.shape(k)) != tuple(v.shape):
                raise SurgeryError(
                    f"{self.ckpt.path}: tensor '{k}' has shape {tuple(self.ckpt.shape(k))}, --model {self.spec} "
                    f"expects {tuple(v.shape)}"
                )
        extra = [k for k in self.ckpt if k not in own]
        if extra:
            raise SurgeryError(f"{self.ckpt.path}: tensor '{extra[0]}' is not part of --model {self.spec}")

    # ----- structure ----------------------------------------------------------------------------
    def _first_layer(self, module: nn.Module) -> nn.Module | None:
        from torch import nn

        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
        return next((m for m in module.modules() if isinstance(m, kinds)), None)

    def classifier(self) -> Linear | None:
        """The module's last ``nn.Linear`` (in the order ``named_modules`` lists them, its definition order),
        as the families without a described head take their last Linear; None when it has none."""
        from torch import nn

        last = None
        for name, m in self._instantiate(meta=True).named_modules():
            if isinstance(m, nn.Linear):
                last = name
        if last is None:
            return None
        prefix = f"{last}." if last else ""
        bias = f"{prefix}bias"
        return Linear(f"{prefix}weight", bias if bias in self.ckpt else None)

    # ----- running ------------------------------------------------------------------------------
    def input_names(self) -> list[str]:
        module = self._instantiate(meta=True)
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return params or ["input"]

    def build_module(self, state=None, dtype=None) -> nn.Module:
        module = self._instantiate()
        if state is not None:
            extra = [k for k in state if k not in module.state_dict()]
            if extra:
                raise SurgeryError(f"{self.ckpt.path}: tensor '{extra[0]}' is not part of --model {self.spec}")
        module = self.load_state(module, state, dtype)
        if not callable(getattr(module, "stages", None)):
            module.stages = types.MethodType(_sequential_stages, module)
        return module

    def example_inputs(self, batch=2, seq_len=8, generator=None) -> dict[str, torch.Tensor]:
        import torch
        from torch import nn

        module = self._instantiate(meta=True)
        name = self.input_names()[0]
        shape = getattr(module, "example_input_shape", None)
        if shape is not None:
            return {name: torch.randn(batch, *shape, generator=generator)}
        first = self._first_layer(module)
        if isinstance(first, nn.Linear):
            return {name: torch.randn(batch, first.in_features, generator=generator)}
        if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
            return {name: torch.randn(batch, first.in_channels, *[DEFAULT_SPATIAL] * dims, generator=generator)}
        if isinstance(first, nn.Embedding):
            return {name: torch.randint(0, first.num_embeddings, (batch, seq_len), generator=generator)}
        raise SurgeryError(
            f"--model '{self.spec}': cannot tell the input shape (no Linear/Conv/Embedding); "
            "give the module an example_input_shape attribute"
        )

    def describe(self) -> dict:
        d = super().describe()
        d["model"] = self.spec
        d["num_layers"] = len(list(self._instantiate(meta=True).children()))
        return d
