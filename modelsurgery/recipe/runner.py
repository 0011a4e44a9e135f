"""`surgery run RECIPE.yml`: a mergekit config, or a list of steps chaining surgery commands.

A recipe file is either a mergekit merge configuration (it has ``merge_method``), written to
``-o OUT`` as mergekit writes it, or::

    steps:
      - name: merged                    # a name later steps use as an input
        run: merge                      # a surgery command (merge, grow, quantize, export, ...) or mergekit
        inputs: [a/, b/]                # paths or earlier steps' names
        options: {method: linear}       # the command's long options, without the dashes
        output: merged.safetensors      # under OUT; default: the step's name
      - name: mk
        run: mergekit
        config: {merge_method: slerp, ...}   # or a path to a mergekit YAML file
        options: {dtype: bfloat16}      # optional: dtype (= out_dtype), max_shard_size, no_input_hash

Steps run in order; each is skipped when its record shows the same operation, parameters and
input hashes and its output is unchanged (``--force`` reruns all). The first failing step stops
the run; the outputs of the steps before it stay as written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelsurgery.errors import SurgeryError
from modelsurgery.recipe import cache
from modelsurgery.recipe.mergekit_config import is_mergekit_config
from modelsurgery.recipe.steps import Step, command_step, mergekit_step

STEP_KEYS = ("name", "run", "inputs", "options", "output", "config")


@dataclass
class RunOptions:
    dry_run: bool = False
    force: bool = False
    #: writing options for a mergekit config recipe, by their recipe names (dtype, max_shard_size,
    #: no_input_hash); a steps recipe gives them per step, in its options
    write: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    run: str
    status: str  # ran | cached | planned | failed
    output: str
    command: str
    inputs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    result: dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RecipeResult:
    recipe: str
    kind: str  # mergekit | steps
    output: str
    dry_run: bool
    steps: list[StepResult]
    ok: bool = True
    error: str | None = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["steps"] = [s.to_dict() for s in self.steps]
        return d


class RecipeFailed(SurgeryError):
    """A step failed; ``result`` holds every step up to it."""

    def __init__(self, message: str, result: RecipeResult):
        super().__init__(message)
        self.result = result


def load_recipe(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such recipe file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SurgeryError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise SurgeryError(f"{path}: a recipe is a mapping (a mergekit config or 'steps:')")
    return doc


def plan_recipe(path: Path, out: Path, commands: Mapping[str, Any], write: Mapping[str, Any] | None = None
                ) -> tuple[str, list[Step]]:
    """The steps of a recipe file, resolved (options parsed, inputs and outputs named); runs nothing.
    ``write``: writing options for a mergekit config (a steps recipe sets them per step)."""
    doc = load_recipe(path)
    out = Path(out)
    if is_mergekit_config(doc):
        return "mergekit", [mergekit_step("merge", doc, out, {}, f"{path}", write)]
    if write:
        flags = ", ".join("--" + k.replace("_", "-") for k in write)
        verb = "applies" if len(write) == 1 else "apply"
        raise SurgeryError(f"{path}: {flags} {verb} only to a mergekit config; in a steps recipe give them in each "
                           "step's options (e.g. options: {dtype: bfloat16})")
    extra = [k for k in doc if k != "steps"]
    if extra:
        raise SurgeryError(f"{path}: key '{extra[0]}' is not a recipe key (a recipe has 'steps:', or is a mergekit "
                           "config with 'merge_method:')")
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise SurgeryError(f"{path}: 'steps' must be a non-empty list")
    steps: list[Step] = []
    outputs: dict[str, Path] = {}
    for i, raw in enumerate(doc["steps"]):
        where = f"{path}: steps[{i}]"
        if not isinstance(raw, dict):
            raise SurgeryError(f"{where}: a step is a mapping with {', '.join(STEP_KEYS)}")
        bad = [k for k in raw if k not in STEP_KEYS]
        if bad:
            raise SurgeryError(f"{where}: key '{bad[0]}' is not a step key (step keys: {', '.join(STEP_KEYS)})")
        name, run = raw.get("name"), raw.get("run")
        if not isinstance(name, str) or not name:
            raise SurgeryError(f"{where}: every step needs a name")
        where = f"{path}: step '{name}'"
        if name in outputs:
            raise SurgeryError(f"{where}: the name is used by an earlier step")
        output_name = str(raw.get("output", name))
        if Path(output_name).is_absolute() or ".." in Path(output_name).parts or output_name.startswith("."):
            raise SurgeryError(f"{where}: output '{output_name}' must be a plain name under the output folder")
        output = out / output_name
        if output in outputs.values():
            raise SurgeryError(f"{where}: output '{output_name}' is written by an earlier step")
        if run == "mergekit":
            config = raw.get("config")
            if isinstance(config, str):
                config = load_recipe(Path(config))
            if not is_mergekit_config(config):
                raise SurgeryError(f"{where}: run: mergekit needs 'config:', a mergekit config or its YAML file")
            if "inputs" in raw:
                raise SurgeryError(f"{where}: a mergekit step names its models in its config, not inputs")
            options = raw.get("options") or {}
            if not isinstance(options, dict):
                raise SurgeryError(f"{where}: options is a mapping (dtype, max_shard_size, no_input_hash)")
            step = mergekit_step(name, config, output, outputs, where, options)
        else:
            if run not in commands:
                raise SurgeryError(f"{where}: run '{run}' is not a surgery command (commands: "
                                   f"{', '.join(sorted(commands))}, mergekit)")
            if "config" in raw:
                raise SurgeryError(f"{where}: 'config' belongs to run: mergekit steps")
            inputs = raw.get("inputs", [])
            inputs = [inputs] if isinstance(inputs, str) else inputs
            options = raw.get("options") or {}
            if not isinstance(inputs, list) or not isinstance(options, dict):
                raise SurgeryError(f"{where}: inputs is a list and options a mapping")
            step = command_step(name, run, commands[run], inputs, options, output, outputs, where)
        steps.append(step)
        outputs[name] = output
    return "steps", steps


def run_recipe(path: Path, out: Path, commands: Mapping[str, Any], options: RunOptions,
               progress: Callable[[str, int, int, dict], None] | None = None) -> RecipeResult:
    """Run (or with ``dry_run`` only plan) a recipe; raises RecipeFailed naming the first failing step."""
    out = Path(out)
    kind, steps = plan_recipe(path, out, commands, options.write)
    recipe = Path(path).resolve()
    for step in steps:
        target = step.output.resolve()
        if target == recipe or target in recipe.parents:
            raise SurgeryError(f"step '{step.name}': output {step.output} would overwrite the recipe {path}")
    result = RecipeResult(str(path), kind, str(out), options.dry_run, [])
    created = False
    if kind == "steps" and not options.dry_run:
        if out.exists() and not out.is_dir():
            raise SurgeryError(f"{out}: a multi-step recipe writes into a folder; this is a file")
        if not out.parent.exists():
            raise SurgeryError(f"{out.parent}: output folder does not exist")
        created = not out.exists()
        out.mkdir(exist_ok=True)
    try:
        _run_steps(steps, result, options, progress)
    except RecipeFailed:
        if created and not any(out.iterdir()):
            out.rmdir()  # the first step failed: leave no empty folder behind
        raise
    return result


def _run_steps(steps: list[Step], result: RecipeResult, options: RunOptions,
               progress: Callable[[str, int, int, dict], None] | None) -> None:
    produced = {s.output for s in steps}
    for i, step in enumerate(steps):
        inputs = [{"path": str(p), "bytes": cache.size_of(p) if p.exists() else None,
                   "from_step": next((s.name for s in steps[:i] if s.output == p), None)} for p in step.inputs]
        sr = StepResult(step.name, step.run, "planned", str(step.output),
                        step.command_line() if step.run != "mergekit" else f"mergekit config -> {step.output}", inputs)
        result.steps.append(sr)
        if progress is not None:
            progress("recipe", i, len(steps), {"step": step.name})
        missing = [p for p in step.inputs if not p.exists() and p not in produced]
        if missing:
            raise _fail(result, sr, f"input '{missing[0]}' does not exist")
        if options.dry_run:
            ready = all(p.exists() for p in step.inputs)
            # an input an earlier step is about to rebuild may change: the steps reading it run again too
            stale = any(s.status != "cached" for s in result.steps[:i] if Path(s.output) in step.inputs)
            if not options.force and ready and not stale and cache.is_cached(step.run, step.parameters, step.inputs,
                                                                             step.output):
                sr.status = "cached"
            continue
        start = time.perf_counter()
        if not options.force and cache.is_cached(step.run, step.parameters, step.inputs, step.output):
            sr.status = "cached"
            sr.result = (cache.read_record(step.output) or {}).get("result")
        else:
            # an output an earlier run of this recipe wrote (it has a record) is stale and rebuilt
            replace = options.force or cache.read_record(step.output) is not None
            try:
                sr.result = step.execute(replace, None if progress is None else _step_progress(progress, step, i,
                                                                                               len(steps)))
            except (SurgeryError, OSError) as e:
                sr.seconds = time.perf_counter() - start
                raise _fail(result, sr, str(e)) from None
            cache.write_record(step.run, step.parameters, step.inputs, step.output, sr.result)
            sr.status = "ran"
        sr.seconds = time.perf_counter() - start
    if progress is not None:
        progress("recipe", len(steps), len(steps), {})


def _step_progress(progress: Callable[[str, int, int, dict], None], step: Step, index: int, count: int
                   ) -> Callable[[str, int, int, dict], None]:
    """A step's tasks under names that say which step they belong to: two steps' "write" are two bars."""
    label = f"step {index + 1}/{count} {step.name}"
    return lambda task, done, total, info=None: progress(f"{label}: {task}", done, total, info or {})


def _fail(result: RecipeResult, sr: StepResult, message: str) -> RecipeFailed:
    sr.status, sr.error = "failed", message
    result.ok = False
    result.error = f"step '{sr.name}' ({sr.run}) failed: {message}"
    return RecipeFailed(result.error, result)
