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
    shape and dtype kept, no storage); buffers are left where they are made. ``torch.nn.init``'s
    functions leave meta tensors alone: they hold no values to initialise, and the first random
    initialiser run on the meta device costs almost a second (torch loads its meta decompositions)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    inits = {name: getattr(nn.init, name) for name in _INITIALISERS}
    nn.Module.register_parameter = register
    for name, fn in inits.items():
        setattr(nn.init, name, _skipping_meta(fn))
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


#: the ``torch.nn.init`` functions torch's modules call from ``reset_parameters``
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


def _skipping_meta(init):
    def initialise(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return initialise


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
