"""Loss and accuracy (or perplexity) along the linear path between two models, naive and matched,
and the loss barrier: max_t [L((1-t)A + tB) - ((1-t)L(A) + tL(B))] (Frankle et al. 2020;
Entezari et al. 2022). Metrics come from ``ops.evaluate``; data from ``modelsurgery.data``.
"""

from __future__ import annotations

from pathlib import Path

from modelsurgery.data import Dataset, load_data
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.evaluate import evaluate
from modelsurgery.ops.match.spec import apply_permutation
from modelsurgery.ops.merge.repair import repair


def load_eval_data(path: Path, ckpt) -> Dataset:
    """A data file; text files are tokenized with the first model's tokenizer.json when it has one."""
    folder = getattr(ckpt, "folder", None)
    tokenizer = folder / "tokenizer.json" if folder is not None and (folder / "tokenizer.json").is_file() else None
    return load_data(path, tokenizer=tokenizer)


def metric_name(result: dict) -> str:
    return "accuracy" if "accuracy" in result else "perplexity"


def barrier(curve: list[dict], key: str = "loss", sign: float = 1.0) -> float:
    """Largest rise of ``sign * key`` above the straight line between the endpoints."""
    a, b = sign * curve[0][key], sign * curve[-1][key]
    return max(sign * p[key] - ((1 - p["alpha"]) * a + p["alpha"] * b) for p in curve)


def _mix(states, weights):
    return {k: sum(w * s[k].float() for s, w in zip(states, weights)).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[0][k] for k in states[0]}


def evaluate_path(family, ckpts, aligned, spec, merged, weights, options, progress=None):
    """(evaluation report, repaired output state or None)."""
    if options.eval_data is None:
        raise SurgeryError("--repair needs --eval DATA (statistics are measured on it)")
    if not family.runnable:
        raise SurgeryError(f"{ckpts[0].path}: {family.not_runnable_reason()} (--eval and --repair run the model)")
    scored = family.output_kind == "logits"  # an encoder's hidden states have no loss to score
    if not scored and not options.repair:
        raise SurgeryError(f"{ckpts[0].path}: family '{family.name}' outputs hidden states, not logits, so --eval has "
                           "no loss to score (with --repair the data sets the merged model's statistics)")
    data = load_eval_data(options.eval_data, ckpts[0])
    inputs = data.model_inputs(family)
    states = [c.state_dict() for c in ckpts]
    matched = [s if p is None else apply_permutation(s, spec, p) for s, (p, _) in zip(states, aligned)]

    def score(module) -> dict:
        return evaluate(module, family, data, batch_size=256)

    protected = set(family.head_names())

    def fix(module, endpoints, w) -> dict:
        return repair(module, [family.build_module(s) for s in endpoints], w, inputs, protected, str(ckpts[0].path))

    def run(endpoints, w):
        module = family.build_module(_mix(endpoints, w))
        if options.repair:
            fix(module, endpoints, w)
        return module

    report: dict = {"data": str(options.eval_data), "repair": options.repair,
                    "endpoints": [score(family.build_module(s)) for s in states]}
    metric = metric_name(report["endpoints"][0]) if scored else None
    report["metric"] = metric
    if scored and len(states) == 2 and options.points >= 2:
        alphas = [i / (options.points - 1) for i in range(options.points)]
        curves = {"naive": states}
        if spec is not None:
            curves["matched"] = matched
        total, done = len(alphas) * len(curves), 0
        for label, endpoints in curves.items():
            curve = []
            for t in alphas:
                r = score(run(endpoints, [1 - t, t]))
                curve.append({"alpha": t, **r})
                done += 1
                if progress:
                    progress("evaluating path", done, total, {label: r["loss"]})
            report[label] = curve
            report[f"{label}_barrier"] = barrier(curve)
            # accuracy falls below the line (sign -1); perplexity rises above it
            report[f"{label}_{metric}_barrier"] = barrier(curve, metric, -1.0 if metric == "accuracy" else 1.0)
    names = ckpts[0].keys()
    out_state = {k: merged(k) for k in names}
    module = family.build_module(out_state)
    if options.repair:
        report["repaired"] = fix(module, matched, weights)
        out_state = {k: v.to(out_state[k].dtype) for k, v in module.state_dict().items() if k in out_state}
    report["merged"] = score(module)
    return report, (out_state if options.repair else None)
