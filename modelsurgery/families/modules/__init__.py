"""The torch modules the families run: one file per family (``mlp.py``, ``cnn.py``, ``resnet.py``,
``gpt2.py``, ``bert.py``, ``decoder.py``), the transformer parts they share (``transformer.py``) and the
rotary tables (``rope.py``).

Only a family's ``build_module``/``example_inputs`` (and code that runs a model) imports these; the
family files one level up describe a checkpoint without torch (see ``families/base.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this context every parameter a module registers is moved to the meta device (its
    shape and dtype kept, no storage); buffers are left where they are made."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Place ``module`` at ``dotted`` inside ``root``, creating plain containers on the way, so that
    parameter names are the checkpoint's tensor names."""
    parts = dotted.split(".")
    parent = root
    for p in parts[:-1]:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    parent.add_module(parts[-1], module)
