"""Recipe steps: a ``surgery`` command run with options named as on its command line, or a mergekit config.

A command step reuses the command's own option declarations (the Typer/click parameters): the
recipe's ``options`` become that command line, click parses and checks it exactly as it parses
a typed one, and the command runs with ``--json`` so its result is the step's result. There is
no second vocabulary: ``surgery grow --factor 2`` is ``{run: grow, options: {factor: 2}}``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsurgery.checkpoint.hub import parse_hub_id, resolve_hub_id
from modelsurgery.checkpoint.store import weight_files
from modelsurgery.checkpoint.writer import DEFAULT_MAX_SHARD, WriteOptions
from modelsurgery.errors import SurgeryError
from modelsurgery.families.custom import factory_file
from modelsurgery.recipe.mergekit_config import MergekitConfig, parse_config
from modelsurgery.recipe.mergekit_merge import run_mergekit, with_out_dtype

Progress = Callable[[str, int, int, dict], None]

#: options the runner sets itself
RUNNER_OPTIONS = ("output", "json_out", "force", "quiet", "debug")
#: the options a mergekit step takes: the writing options of every command that writes a checkpoint
MERGEKIT_OPTIONS = ("dtype", "max_shard_size", "no_input_hash")


@dataclass
class Step:
    """One step, resolved: its operation, the command line it amounts to, its inputs and output."""

    name: str
    run: str
    output: Path
    inputs: list[Path]  # every file or folder it reads (hashed for the cache)
    parameters: dict[str, Any]  # what the cache compares: the parsed options, paths as given
    argv: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)  # earlier steps it reads
    execute: Callable[[bool, Progress | None], dict] | None = None  # (force, progress) -> result dict

    def command_line(self) -> str:
        return " ".join(["surgery", self.run, *(_quote(a) for a in self.argv)])


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_./:=,*" for c in a) else json.dumps(a)


def _option_for(command: Any, key: str) -> Any:
    flag = "--" + str(key).replace("_", "-")
    for p in command.params:
        if flag in p.opts or flag in p.secondary_opts:
            return p
    return None


def _option_args(command: Any, run: str, options: Mapping[str, Any], where: str) -> list[tuple[Any, list[str]]]:
    """The command-line words for ``options`` as (parameter, words) pairs; each key is a long option of the
    command, a true/false value sets a flag (``--x`` or ``--no-x``), a list repeats a repeatable option."""
    pairs: list[tuple[Any, list[str]]] = []
    for key, value in options.items():
        p = _option_for(command, key)
        if p is None or not p.opts or not p.opts[0].startswith("-"):
            known = sorted(o[2:] for q in command.params for o in q.opts + q.secondary_opts
                           if o.startswith("--") and q.name not in RUNNER_OPTIONS)
            raise SurgeryError(f"{where}: '{key}' is not an option of surgery {run} (its options: {', '.join(known)})")
        if p.name in RUNNER_OPTIONS:
            raise SurgeryError(f"{where}: option '{key}' is set by surgery run itself (output: and --force)")
        flag = "--" + str(key).replace("_", "-")
        long_on = next(o for o in p.opts if o.startswith("--"))
        if getattr(p, "is_flag", False):
            if not isinstance(value, bool):
                raise SurgeryError(f"{where}: option '{key}' is true or false, got {value!r}")
            if flag in p.secondary_opts:  # e.g. asymmetric: true
                value = not value
            if value:
                pairs.append((p, [long_on]))
            elif p.secondary_opts:
                pairs.append((p, [p.secondary_opts[0]]))
            continue
        values = value if isinstance(value, list) and getattr(p, "multiple", False) else [value]
        for v in values:
            if isinstance(v, (dict, list)):
                raise SurgeryError(f"{where}: option '{key}' takes one value, got {v!r}")
            pairs.append((p, [long_on, _word(v)]))
    return pairs


def _word(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def command_step(name: str, run: str, command: Any, inputs: list[str], options: Mapping[str, Any],
                 output: Path, outputs: Mapping[str, Path], where: str) -> Step:
    """A step running ``surgery RUN``; ``outputs``: earlier steps' names -> their output paths."""
    if _option_for(command, "output") is None:
        raise SurgeryError(f"{where}: surgery {run} writes no output; it cannot be a recipe step")
    args = [p for p in command.params if not p.opts[0].startswith("-")]
    pairs = _option_args(command, run, options, where)
    depends: list[str] = []

    def resolve(word: str) -> str:
        if word in outputs:
            depends.append(word)
            return str(outputs[word])
        return word

    positional = [resolve(str(i)) for i in inputs]
    if len(args) == 1 and args[0].nargs == 1 and len(positional) != 1:
        raise SurgeryError(f"{where}: surgery {run} takes one input, the recipe gives {len(positional)}")
    head = [*positional, "-o", str(output)]
    params = _parse(command, run, head + [w for _, words in pairs for w in words], where)
    # an option whose value is a path may name an earlier step too (e.g. merge's base: merged)
    opts = []
    for p, words in pairs:
        opts += [words[0], resolve(words[1])] if len(words) == 2 and _is_path(params.get(p.name)) else words
    argv = head + opts
    params = _parse(command, run, argv, where)
    input_paths = []
    for key, value in params.items():
        if key == "output":
            continue
        if key == "model" and isinstance(value, str):  # --model: the user's module file is an input too
            input_paths += [f for f in [factory_file(value)] if f is not None]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, Path) and (v.exists() or str(v) in {str(o) for o in outputs.values()}):
                input_paths.append(v)
                if v.is_file() and v.name.endswith(".index.json"):  # the shards it names hold the weights
                    input_paths += weight_files(v)
            elif isinstance(v, Path) and parse_hub_id(str(v)) is not None:
                # a hub id: the cached snapshot its revision names now (another commit is another input)
                with contextlib.suppress(SurgeryError):  # not cached: the command says so when it runs
                    input_paths.append(resolve_hub_id(str(v)))
    parameters = {k: v for k, v in params.items() if k not in RUNNER_OPTIONS}

    def execute(force: bool, progress: Progress | None = None) -> dict:
        return _invoke(command, run, dict(params, json_out=True, quiet=True, debug=True, force=force), progress)

    return Step(name, run, output, list(dict.fromkeys(input_paths)), parameters, argv, list(dict.fromkeys(depends)),
                execute)


def _is_path(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, Path) for v in value)
    return isinstance(value, Path)


def _parse(command: Any, run: str, argv: list[str], where: str) -> dict:
    try:
        ctx = command.make_context(run, list(argv))
    except Exception as e:  # click's usage errors: an unknown option, a value of the wrong type
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        raise SurgeryError(f"{where}: surgery {run}: {msg}") from None
    return dict(ctx.params)


def _invoke(command: Any, run: str, params: dict, progress: Progress | None = None) -> dict:
    """Run the command with ``--json`` and return its JSON object (its errors propagate as SurgeryError).
    ``progress``: where the command reports its progress (the recipe's display) instead of its own."""
    from modelsurgery.cli.progress import reporting_to

    ctx = command.make_context(run, [], resilient_parsing=True)
    buffer = io.StringIO()
    with ctx, contextlib.redirect_stdout(buffer), reporting_to(progress):
        try:
            ctx.invoke(command.callback, **params)
        except SystemExit as e:
            if e.code:
                raise SurgeryError(f"surgery {run} exited with status {e.code}") from None
        except RuntimeError as e:  # typer.Exit (a RuntimeError with an exit code), e.g. after a printed error
            if not hasattr(e, "exit_code"):
                raise
            if e.exit_code:
                raise SurgeryError(f"surgery {run} exited with status {e.exit_code}") from None
    text = buffer.getvalue().strip()
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"stdout": text}


def write_options(options: Mapping[str, Any], where: str) -> WriteOptions:
    """A mergekit step's ``options`` (dtype, max_shard_size, no_input_hash: named and checked as on the
    commands' command lines) as the writer's options."""
    given = {str(k).replace("-", "_"): v for k, v in options.items()}
    for key, value in given.items():
        if key not in MERGEKIT_OPTIONS:
            raise SurgeryError(f"{where}: '{key}' is not an option of a mergekit step (its options: "
                               f"{', '.join(MERGEKIT_OPTIONS)}; the merge itself is described by its config)")
        if key == "no_input_hash" and not isinstance(value, bool):
            raise SurgeryError(f"{where}: option 'no_input_hash' is true or false, got {value!r}")
        if key != "no_input_hash" and (isinstance(value, (bool, list, dict)) or value is None):
            raise SurgeryError(f"{where}: option '{key}' takes one value, got {value!r}")
    write = WriteOptions(dtype=given.get("dtype"), max_shard_size=given.get("max_shard_size", DEFAULT_MAX_SHARD),
                         hash_inputs=not given.get("no_input_hash", False))
    try:
        write.check_write_options()
    except SurgeryError as e:
        raise SurgeryError(f"{where}: {e}") from None
    return write


def mergekit_step(name: str, config: Mapping[str, Any], output: Path, outputs: Mapping[str, Path],
                  where: str, options: Mapping[str, Any] | None = None) -> Step:
    """A step running a mergekit config; model references may name earlier steps. ``options``: the
    writing options (dtype as the config's out_dtype, max_shard_size, no_input_hash)."""
    depends: list[str] = []

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (resolve_model(v) if k in ("model", "base_model") else resolve(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    def resolve_model(v: Any) -> Any:
        if isinstance(v, str) and v in outputs:
            depends.append(v)
            return str(outputs[v])
        return v

    doc = resolve(dict(config))
    cfg: MergekitConfig = parse_config(doc, where)
    write = write_options(options or {}, where)
    try:
        with_out_dtype(cfg, write)  # a dtype that contradicts the config's out_dtype fails before any step runs
    except SurgeryError as e:
        raise SurgeryError(f"{where}: {e}") from None
    inputs = [Path(m) for m in cfg.referenced_models()]
    parameters: dict[str, Any] = {"config": doc, **({"options": dict(options)} if options else {})}

    def execute(force: bool, progress: Progress | None = None) -> dict:
        return run_mergekit(parse_config(doc, where), output, force=force, progress=progress, write=write).to_dict()

    return Step(name, "mergekit", output, inputs, parameters, [], list(dict.fromkeys(depends)), execute)
