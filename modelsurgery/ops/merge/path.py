"""Loss and accuracy along the linear path between two models, naive and matched, and the loss
barrier: max_t [L((1-t)A + tB) - ((1-t)L(A) + tL(B))] (Frankle et al. 2020; Entezari et al. 2022).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.match.spec import apply_permutation
from modelsurgery.ops.merge.repair import repair


def load_eval_data(path: Path, family) -> dict[str, torch.Tensor]:
    """Evaluation tensors: ``inputs``/``labels`` (classifiers) or ``input_ids`` (LMs), safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such evaluation data file")
    try:
        data = load_file(str(path))
    except Exception as e:
        raise SurgeryError(f"{path}: not a safetensors data file ({e})") from e
    names = family.input_names()
    if "input_ids" in data and "input_ids" in names:
        return {"input_ids": data["input_ids"].long()}
    if "inputs" in data and "labels" in data:
        return {names[0]: data["inputs"].float(), "labels": data["labels"].long()}
    raise SurgeryError(f"{path}: expected tensors 'inputs' and 'labels', or 'input_ids' (has {sorted(data)})")


@torch.no_grad()
def evaluate_state(module, data: dict[str, torch.Tensor], batch: int = 256) -> dict[str, float]:
    inputs = {k: v for k, v in data.items() if k != "labels"}
    n = next(iter(inputs.values())).shape[0]
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, n, batch):
        b = {k: v[i:i + batch] for k, v in inputs.items()}
        out = module(**b)
        if "labels" in data:
            y = data["labels"][i:i + batch]
        else:  # language model: predict the next token
            out, y = out[:, :-1], b["input_ids"][:, 1:]
        out, y = out.reshape(-1, out.shape[-1]).float(), y.reshape(-1)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(-1) == y).sum())
        count += y.numel()
    loss = loss_sum / count
    res = {"loss": loss, "accuracy": correct / count}
    if "labels" not in data:
        res["perplexity"] = float(torch.exp(torch.tensor(loss)))
    return res


def barrier(curve: list[dict], key: str = "loss") -> float:
    a, b = curve[0][key], curve[-1][key]
    return max(p[key] - ((1 - p["alpha"]) * a + p["alpha"] * b) for p in curve)


def _mix(states, weights):
    return {k: sum(w * s[k].float() for s, w in zip(states, weights)).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[0][k] for k in states[0]}


def evaluate_path(family, ckpts, aligned, spec, merged, weights, options, progress=None):
    """(evaluation report, repaired output state or None)."""
    if options.eval_data is None:
        raise SurgeryError("--repair needs --eval DATA (statistics are measured on it)")
    if not family.runnable:
        raise SurgeryError(f"{ckpts[0].path}: family '{family.name}' cannot be run, so --eval is not possible")
    data = load_eval_data(options.eval_data, family)
    inputs = {k: v for k, v in data.items() if k != "labels"}
    states = [c.state_dict() for c in ckpts]
    matched = [s if p is None else apply_permutation(s, spec, p) for s, (p, _) in zip(states, aligned)]

    def run(endpoints, weights):
        module = family.build_module(_mix(endpoints, weights))
        if options.repair:
            repair(module, [family.build_module(s) for s in endpoints], weights, inputs)
        return module

    report: dict = {"data": str(options.eval_data), "repair": options.repair,
                    "endpoints": [evaluate_state(family.build_module(s), data) for s in states]}
    if len(states) == 2 and options.points >= 2:
        alphas = [i / (options.points - 1) for i in range(options.points)]
        curves = {"naive": states}
        if spec is not None:
            curves["matched"] = matched
        total = len(alphas) * len(curves)
        done = 0
        for label, endpoints in curves.items():
            curve = []
            for t in alphas:
                r = evaluate_state(run(endpoints, [1 - t, t]), data)
                curve.append({"alpha": t, **r})
                done += 1
                if progress:
                    progress("evaluating path", done, total, {label: r["loss"]})
            report[label] = curve
            report[f"{label}_barrier"] = barrier(curve)
            report[f"{label}_accuracy_barrier"] = barrier([{**p, "acc": -p["accuracy"]} for p in curve], "acc")
    out_state = {k: merged(k) for k in ckpts[0].keys()}
    module = family.build_module(out_state)
    if options.repair:
        repair(module, [family.build_module(s) for s in matched], weights, inputs)
        out_state = {k: v.to(out_state[k].dtype) for k, v in module.state_dict().items() if k in out_state}
    report["merged"] = evaluate_state(module, data)
    return report, (out_state if options.repair else None)

