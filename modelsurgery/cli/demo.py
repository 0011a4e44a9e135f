"""`surgery demo`: every capability once, on the bundled fixtures, in a temporary folder.

Each command module may define ``demo_step(fixtures: Path, workdir: Path) -> dict``; the demo
runs them in order and prints what each did, under a line saying what to look at: which steps
change the model's function by design, and for the function-preserving ones that a ~0 change is
the check. The analyze step lives here (its command shares cli/merge.py with merge).
"""

from __future__ import annotations

import importlib
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import typer

from modelsurgery.cli.common import emit_json, out_console, safe, user_errors
from modelsurgery.cli.options import debug_option, force_option, json_option, quiet_option
from modelsurgery.errors import SurgeryError

STEPS = ("inspect", "merge", "analyze", "grow", "align", "quantize", "export", "fold")

#: what each step shows, printed under its title: the expected result, and whether a change is the point
NOTES = {
    "inspect": "headers only: the family, parameters and layers of each bundled model.",
    "merge": "two digits MLPs trained from different seeds, averaged along the path: weight matching first "
             "keeps the midpoint's accuracy where the naive average loses it (a lower barrier is better).",
    "analyze": "why matching helps: per layer, how far apart the two MLPs' weights are and how well their top "
               "singular vectors line up, before and after matching (the merge step's inputs).",
    "grow": "stacking doubles the depth and changes the function by design (training continues from it); width "
            "growth is function-preserving, so its change vs the input is the check and should be ~0.",
    "align": "rescaling the new classes' classifier rows: accuracy should rise and the share of test images "
             "predicted as a new class should fall.",
    "quantize": "3-bit RTN vs FlexRound, both written in the same packed format (so the bytes are equal): compare "
                "accuracy and output cosine.",
    "export": "ONNX Runtime against PyTorch on the same inputs: a max abs diff of ~0 (within the tolerance) is the "
              "check.",
    "fold": "folding a LoRA changes the function by design (that is the adapter); extracting it back at rank 4 "
            "should recover it, relative error ~0.",
}


def find_fixtures(explicit: Path | None = None) -> Path:
    candidates = [explicit] if explicit else [Path.cwd() / "fixtures", Path(__file__).resolve().parents[2] / "fixtures"]
    for c in candidates:
        if c is not None and (c / "digits").is_dir():
            return c
    raise SurgeryError(
        f"{candidates[0]}: bundled fixtures not found (run from the repository root, or pass --fixtures; "
        "regenerate them with python fixtures/make_fixtures.py)"
    )


def analyze_step(fixtures: Path, workdir: Path, quiet: bool = False) -> dict:
    """`surgery analyze` on the merge step's two digits MLPs, summarised in one line."""
    from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair

    a, b = fixtures / "digits" / "mlp_seed0.safetensors", fixtures / "digits" / "mlp_seed1.safetensors"
    r = analyze_pair(a, b, AnalyzeOptions())
    layers = r.layers
    summary = {
        "a": str(a), "b": str(b), "family": r.family, "layers": len(layers),
        # the whole-model L2 distance over the compared weight matrices: root of the summed squares
        "distance_before": math.sqrt(sum(x.distance_before ** 2 for x in layers)),
        "distance_after": math.sqrt(sum(x.distance_after ** 2 for x in layers)),
        "top1_alignment_before": sum(x.alignment_before[0] for x in layers) / len(layers),
        "top1_alignment_after": sum(x.alignment_after[0] for x in layers) / len(layers),
        "objective_before": r.objective_before, "objective_after": r.objective_after,
    }
    if not quiet:
        out_console.print(
            f"analyze {safe(a.name)} vs {safe(b.name)} ({len(layers)} weight matrices): weight matching brings them "
            f"closer, L2 distance {summary['distance_before']:.4g} -> {summary['distance_after']:.4g}; mean top-1 "
            f"singular-vector alignment {summary['top1_alignment_before']:.2f} -> "
            f"{summary['top1_alignment_after']:.2f} (1 = same direction). Per layer: surgery analyze "
            f"{safe(_shown(a))} {safe(_shown(b))}"
        )
    return summary


def _shown(path: Path) -> Path:
    """``path`` as the user would type it from here (relative to the current folder when inside it)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def step_function(step: str) -> Callable[..., dict] | None:
    if step == "analyze":
        return analyze_step
    return getattr(importlib.import_module(f"modelsurgery.cli.{step}"), "demo_step", None)


def parse_only(only: str | None) -> list[str]:
    if only is None:
        return list(STEPS)
    chosen = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown or not chosen:
        raise SurgeryError(f"--only {only}: expected comma-separated steps among {', '.join(STEPS)}")
    return [s for s in STEPS if s in chosen]


def demo_command(
    fixtures: Path = typer.Option(None, "--fixtures", help="Fixtures folder (default: ./fixtures, else the "
                                  "fixtures/ of the checkout modelsurgery runs from)."),
    keep: Path = typer.Option(None, "--keep", help="Write outputs here instead of a temporary folder."),
    only: str = typer.Option(None, "--only", help=f"Run only these steps, comma-separated ({', '.join(STEPS)})."),
    json_out: bool = json_option(),
    force: bool = force_option(help="Replace outputs in the --keep folder (the demo always replaces its own)."),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Run every capability once on the bundled fixtures and print what it did.

    Examples:\n
      surgery demo\n
      surgery demo --only merge,analyze --keep demo-out
    """
    with user_errors(debug):
        steps = parse_only(only)
        root = find_fixtures(fixtures)
        results = {}
        with tempfile.TemporaryDirectory(prefix="surgery-demo-") as tmp:
            workdir = keep or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                fn = step_function(step)
                if fn is None:
                    continue
                if not (json_out or quiet):
                    out_console.rule(f"[bold]{step}")
                    out_console.print(f"[dim]{NOTES[step]}[/]")
                results[step] = fn(root, workdir, quiet=json_out or quiet)
    if json_out:
        emit_json(results)
