"""A progress callback that records what an operation reports, and the checks every task must pass:
one total, counts that never go back, the last count at the total."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from safetensors import safe_open


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, int, int, dict]] = []

    def __call__(self, task: str, done: int, total: int, info: dict | None = None) -> None:
        self.calls.append((task, done, total, info))

    def tasks(self) -> dict[str, list[tuple[int, int]]]:
        """Task -> its (done, total) reports, in order (``info["message"]`` lines are no task)."""
        out: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for task, done, total, info in self.calls:
            if not (info or {}).get("message"):
                out[task].append((done, total))
        return dict(out)

    def finished(self, task: str, total: int) -> list[int]:
        """Assert ``task`` counted up to ``total`` (one total, never backwards, never past it); its counts."""
        reports = self.tasks().get(task)
        assert reports, f"no progress reported for '{task}' (tasks: {sorted(self.tasks())})"
        assert {t for _, t in reports} == {total}, (task, reports)
        done = [d for d, _ in reports]
        assert done == sorted(done) and done[0] >= 0 and done[-1] == total, (task, done)
        return done


def tensors_in(path: Path) -> int:
    """How many tensors a written checkpoint holds (one .safetensors file, or every one in a folder), read back
    with safetensors: what a "write" task must end at."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    n = 0
    for f in files:
        with safe_open(f, "pt") as s:
            n += len(list(s.keys()))
    return n
