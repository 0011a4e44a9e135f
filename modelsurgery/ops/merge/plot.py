"""Plot of loss and accuracy along the interpolation path, naive vs matched (matplotlib, lazy)."""

from __future__ import annotations

from pathlib import Path

from modelsurgery.checkpoint.output import atomic_path, check_output
from modelsurgery.errors import SurgeryError


def check_plot(out: Path, num_models: int, points: int, force: bool = False, inputs=()) -> None:
    """Refuse a plot that cannot be drawn or written before any work is done (the output rules of
    ``checkpoint.output``: existing file only with ``force``, never an input, parent folder exists)."""
    import importlib.util

    check_output(Path(out), force, inputs, folder=False)
    if Path(out).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise SurgeryError(f"{out}: --plot needs a .png, .svg or .pdf file name")
    if num_models != 2 or points < 2:
        raise SurgeryError(f"{out}: a path plot needs two models and --points >= 2")
    if importlib.util.find_spec("matplotlib") is None:
        raise SurgeryError("--plot needs matplotlib: pip install matplotlib")


def plot_path(evaluation: dict, out: Path, force: bool = False) -> Path:
    out = Path(out)
    if "naive" not in evaluation:
        raise SurgeryError(f"{out}: a path plot needs two models and --points >= 2")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label in ("naive", "matched"):
        if label not in evaluation:
            continue
        curve = evaluation[label]
        xs = [p["alpha"] for p in curve]
        axes[0].plot(xs, [p["loss"] for p in curve], marker="o", label=label)
        axes[1].plot(xs, [p[evaluation["metric"]] for p in curve], marker="o", label=label)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel(evaluation["metric"])
    for ax in axes:
        ax.set_xlabel("alpha (0 = first model, 1 = second)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(out, force, is_dir=False) as tmp:
            fig.savefig(tmp, format=out.suffix.lower().lstrip("."))
    finally:
        plt.close(fig)
    return out
