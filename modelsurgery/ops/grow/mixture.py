"""MixtureGrowth (Pham et al. 2024, "MixtureGrowth: Growing Neural Networks by Recombining Learned
Parameters", WACV, Sec. 3): each layer's weight is a linear combination of templates, W = sum_j c_j T_j.
K small networks of one architecture are grown into one K times as wide: the trained layers sit on the
block diagonal, and every off-diagonal block (r, c) is a new combination of the templates of member r
with coefficients orthogonal to all coefficients already in the layer (the paper's best init).

Templates of plain checkpoints (our definition): a member's layer weight W = U S V^T is cut into T
spectral bands, T_j = U_j S_j V_j^T over consecutive groups of singular components, so coefficients
(1, ..., 1) rebuild W exactly and a new combination re-weights the bands of a trained layer. T defaults
to K*K - K + 1, the fewest that leave an orthogonal direction for every off-diagonal block. New
coefficients: a random vector projected onto the orthogonal complement of the layer's existing
coefficients, scaled to ``coef_scale`` x the mean norm of the trained ones.

Checkpoints already in template form (as the MixtureGrowth code writes them) are read directly:
``<layer>.trainable_parameters.template_set_<s>`` [T, out, in] and ``<layer>.coefficients.coefs_member_<m>``
[T]; member m < K (K = number of template sets) is trained member m on template set m.

Layout as in the reference code: the first layer stacks the members' rows (its input is shared), hidden
layers are K x K block matrices, the output layer concatenates the members' columns; we scale it by 1/K
so the grown net equals the ensemble average before the off-diagonal blocks are added. Hidden biases are
concatenated, the output bias averaged. Supported: MLPs (plain or in template form).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint, check_output, plan_tensor
from modelsurgery.errors import SurgeryError
from modelsurgery.families import Linear, detect_family
from modelsurgery.families.mlp import natural_key
from modelsurgery.ops.grow.common import (
    GrowOptions,
    GrowReport,
    Progress,
    new_report,
    no_progress,
    write_grown,
)

TEMPLATE_RE = re.compile(r"^(.*)\.trainable_parameters\.template_set_(\d+)$")
COEF_RE = re.compile(r"^(.*)\.coefficients\.coefs_member_(\d+)$")


@dataclass
class TemplateLayer:
    """One layer in template form: ``templates[s]`` [T, out, in] of member s, ``coefs[s]`` [T]."""

    name: str  # the output tensor name of its weight
    templates: list[torch.Tensor]
    coefs: list[torch.Tensor]
    biases: list[torch.Tensor] | None

    def member(self, m: int) -> torch.Tensor:
        return torch.einsum("t,tij->ij", self.coefs[m], self.templates[m])


def spectral_templates(w: torch.Tensor, num: int) -> torch.Tensor:
    """[T, out, in] bands of the SVD of ``w`` whose sum is ``w``."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    groups = torch.tensor_split(torch.arange(s.numel()), num)
    return torch.stack([(u[:, g] * s[g]) @ vh[g] for g in groups]).to(torch.float32)


def orthogonal_coefficients(existing: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """A unit vector orthogonal to every row of ``existing`` [P, T] (random within the complement); when the
    rows span everything, the direction of least singular value (reported as not orthogonal)."""
    e = existing.double()
    _, s, vh = torch.linalg.svd(e, full_matrices=True)
    rank = int((s > 1e-8 * max(float(s.max()), 1e-30)).sum())
    if rank >= e.shape[1]:
        return vh[-1].float(), False
    null = vh[rank:]
    v = torch.randn(null.shape[0], generator=gen, dtype=torch.float64) @ null
    return (v / v.norm()).float(), True


def plain_layers(ckpts: list[Checkpoint], num_templates: int | None, progress: Progress = no_progress
                 ) -> list[TemplateLayer]:
    families = [detect_family(c) for c in ckpts]
    for c, f in zip(ckpts, families):
        chain = f.chain_layers()
        if not chain or not all(isinstance(x, Linear) and len(c.shape(x.weight)) == 2 for x in chain):
            raise SurgeryError(f"{c.path}: MixtureGrowth supports MLP checkpoints (a chain of linear layers); "
                               f"this one is '{f.name}'")
    a = ckpts[0]
    for c in ckpts[1:]:
        if a.shapes() != c.shapes():
            diff = next((k for k in a if k not in c or a.shape(k) != c.shape(k)), None)
            if diff is None:
                diff = next(k for k in c if k not in a)
            got = list(c.shape(diff)) if diff in c else "missing"
            want = list(a.shape(diff)) if diff in a else "missing"
            raise SurgeryError(
                f"mixture inputs of different shapes: tensor '{diff}' is {want} in {a.path} and {got} in {c.path}"
            )
    first = families[0].describe()
    for c, f in zip(ckpts[1:], families[1:]):  # what shapes cannot tell (an MLP's activation) must agree too
        other = f.describe()
        diff = next((k for k in first if first[k] != other.get(k)), None)
        if diff is not None:
            raise SurgeryError(f"mixture inputs of different architectures: {diff} is {first[diff]!r} in {a.path} "
                               f"and {other.get(diff)!r} in {c.path}")
    k = len(ckpts)
    t = num_templates or k * k - k + 1
    if t < 1:
        raise SurgeryError(f"--templates {t}: need at least one template per layer")
    layers = []
    chain = families[0].chain_layers()
    for i, lin in enumerate(chain):
        ws = [c.get(lin.weight).float() for c in ckpts]
        layers.append(TemplateLayer(
            lin.weight,
            [spectral_templates(w, t) for w in ws],
            [torch.ones(t) for _ in ws],
            [c.get(lin.bias).float() for c in ckpts] if lin.bias else None,
        ))
        progress("templates", i + 1, len(chain), {})  # an SVD per input and layer
    return layers


def template_form_layers(ckpt: Checkpoint) -> list[TemplateLayer]:
    sets: dict[str, dict[int, str]] = {}
    coefs: dict[str, dict[int, str]] = {}
    for name in ckpt:
        if m := TEMPLATE_RE.match(name):
            sets.setdefault(m.group(1), {})[int(m.group(2))] = name
        elif m := COEF_RE.match(name):
            coefs.setdefault(m.group(1), {})[int(m.group(2))] = name
    layers = []
    for prefix in sorted(sets, key=natural_key):
        k = len(sets[prefix])
        if sorted(sets[prefix]) != list(range(k)) or any(m not in coefs.get(prefix, {}) for m in range(k)):
            raise SurgeryError(
                f"{ckpt.path}: layer '{prefix}' needs template_set_0..{k - 1} and coefs_member_0..{k - 1}"
            )
        templates = [ckpt.get(sets[prefix][s]).float() for s in range(k)]
        members = [ckpt.get(coefs[prefix][m]).float().reshape(-1) for m in range(k)]
        for s, (tpl, c) in enumerate(zip(templates, members)):
            if tpl.dim() != 3 or tpl.shape[0] != c.numel():
                raise SurgeryError(
                    f"{ckpt.path}: tensor '{sets[prefix][s]}' {list(tpl.shape)} does not match "
                    f"'{coefs[prefix][s]}' ({c.numel()} coefficients); expected [T, out, in] linear templates"
                )
        bias = f"{prefix}.bias"
        layers.append(TemplateLayer(f"{prefix}.weight", templates, members,
                                    [ckpt.get(bias).float()] * k if bias in ckpt else None))
    if len({len(x.templates) for x in layers}) != 1:
        raise SurgeryError(f"{ckpt.path}: layers have different numbers of template sets")
    used = {n for p in sets.values() for n in p.values()} | {n for p in coefs.values() for n in p.values()}
    rest = [n for n in ckpt if n not in used and not n.endswith(".bias")]
    if rest:
        raise SurgeryError(f"{ckpt.path}: tensor '{rest[0]}' is neither a template set nor a coefficient vector")
    return layers


def is_template_form(ckpt: Checkpoint) -> bool:
    return any(TEMPLATE_RE.match(n) for n in ckpt)


def grow_layer(layer: TemplateLayer, position: str, coef_scale: float, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """The grown weight and bias of one layer; also how many new blocks there are and how many are orthogonal."""
    k = len(layer.templates)
    members = [layer.member(m) for m in range(k)]
    if position == "first":
        w = torch.cat(members, 0)
        b = torch.cat(layer.biases) if layer.biases else None
        return w, b, 0, 0
    if position == "last":
        w = torch.cat(members, 1) / k
        b = torch.stack(layer.biases).mean(0) if layer.biases else None
        return w, b, 0, 0
    existing = list(layer.coefs)
    scale = coef_scale * float(torch.stack([c.norm() for c in layer.coefs]).mean())
    rows, new, ortho = [], 0, 0
    for r in range(k):
        row = []
        for c in range(k):
            if r == c:
                row.append(members[r])
                continue
            direction, is_orth = orthogonal_coefficients(torch.stack(existing), gen)
            coef = direction * scale
            existing.append(coef)
            new += 1
            ortho += int(is_orth)
            row.append(torch.einsum("t,tij->ij", coef, layer.templates[r]))
        rows.append(torch.cat(row, 1))
    b = torch.cat(layer.biases) if layer.biases else None
    return torch.cat(rows, 0), b, new, ortho


def grow_mixture(ckpts: list[Checkpoint], out: Path, options: GrowOptions, progress: Progress = no_progress
                 ) -> GrowReport:
    if len(ckpts) == 1 and is_template_form(ckpts[0]):
        layers = template_form_layers(ckpts[0])
        source = "template form"
    elif len(ckpts) < 2:
        raise SurgeryError(
            "--method mixture needs two or more checkpoints of one architecture (or one in template form)"
        )
    else:
        layers = plain_layers(ckpts, options.num_templates, progress)
        source = "spectral bands of the inputs' weights"
    if len(layers) < 2:
        raise SurgeryError(f"{ckpts[0].path}: MixtureGrowth needs at least two layers")
    if options.coef_scale < 0:
        raise SurgeryError(f"--coef-scale {options.coef_scale}: must be >= 0")
    check_output(out, options.force, [c.path for c in ckpts])
    gen = torch.Generator().manual_seed(options.seed)
    report = new_report("mixture", ckpts, out, detect_family(ckpts[0]) if source != "template form"
                        else _Named("mlp-templates"))
    plans, new_blocks, orthogonal = [], 0, 0
    dtype = ckpts[0].dtype()
    for i, layer in enumerate(layers):
        position = "first" if i == 0 else "last" if i == len(layers) - 1 else "hidden"
        w, b, n, o = grow_layer(layer, position, options.coef_scale, gen)
        new_blocks, orthogonal = new_blocks + n, orthogonal + o
        plans.append(plan_tensor(layer.name, w.to(dtype)))
        report.width_before[layer.name] = layer.member(0).shape[0]
        report.width_after[layer.name] = w.shape[0]
        if b is not None:
            plans.append(plan_tensor(layer.name[: -len("weight")] + "bias", b.to(dtype)))
        progress("mixture", i + 1, len(layers), {})
    report.notes.append(f"templates: {source}; {len(layers[0].templates[0])} per member and layer")
    report.notes.append(f"{new_blocks} new off-diagonal blocks, {orthogonal} with coefficients orthogonal "
                        "to the existing ones")
    return write_grown(out, ckpts, plans, options, report, None, progress)


class _Named:
    def __init__(self, name: str):
        self.name = name
