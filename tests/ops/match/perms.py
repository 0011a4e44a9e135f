"""Random permutations of every group of a spec (tests of function preservation)."""

import torch

from modelsurgery.ops.match.spec import Perms, PermutationSpec


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    out: Perms = {}
    for name, g in spec.groups.items():
        if g.kind == "free":
            out[name] = {"p": torch.randperm(g.size, generator=generator)}
        else:
            qk = (torch.arange(g.head_dim).repeat(g.size, 1) if g.rotary else
                  torch.stack([torch.randperm(g.head_dim, generator=generator) for _ in range(g.size)]))
            vo = torch.stack([torch.randperm(g.head_dim, generator=generator) for _ in range(g.size)])
            out[name] = {"heads": torch.randperm(g.size, generator=generator), "qk": qk, "vo": vo}
    return out
