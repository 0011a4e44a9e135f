"""Multi-step recipes: surgery commands chained by name, options as on the command line, cached reruns,
byte-identical outputs, --dry-run, --json, and a failing step named with earlier outputs intact."""

import hashlib
import json
import time
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app

runner = CliRunner()

PIPELINE = """
steps:
  - name: tuned
    run: fold
    inputs: [{a}, {lora}]
  - name: merged
    run: merge
    inputs: [tuned, {b}]
    options: {{method: match, seed: 0}}
  - name: stacked
    run: grow
    inputs: [merged]
    options: {{method: stack, factor: {factor}}}
  - name: q
    run: quantize
    inputs: [stacked]
    options: {{method: rtn, bits: 4, format: packed, asymmetric: true}}
  - name: onnx
    run: export
    inputs: [q]
    output: model.onnx
"""


def write(tmp_path, text, name="recipe.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def run(recipe, out, *extra):
    return runner.invoke(app, ["run", str(recipe), "-o", str(out), *extra])


def first_status(recipe, out):
    """Run ``recipe`` into ``out`` and return its first step's status ("ran" or "cached")."""
    r = run(recipe, out, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["steps"][0]["status"]


def hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".surgery-run" not in p.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory, llamas, lora):
    """The pipeline run once (shared by the tests that only read its outputs)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    recipe = write(tmp, PIPELINE.format(a=llamas["a"], b=llamas["b"], lora=lora, factor=2))
    out = tmp / "build"
    r = run(recipe, out, "--json")
    assert r.exit_code == 0, r.output
    return recipe, out, json.loads(r.stdout)


def test_pipeline_runs_every_step(built, llamas, lora):
    _, out, report = built
    assert report["kind"] == "steps" and report["ok"]
    assert [(s["name"], s["run"], s["status"]) for s in report["steps"]] == [
        ("tuned", "fold", "ran"), ("merged", "merge", "ran"), ("stacked", "grow", "ran"), ("q", "quantize", "ran"),
        ("onnx", "export", "ran")]
    assert report["steps"][0]["result"]["tensors_updated"] == 6  # q_proj and v_proj of 3 layers
    from tests.ops.adapters.peft_helpers import peft_merged

    reference = peft_merged(llamas["a"], lora).state_dict()  # PEFT's own merge_and_unload
    tuned = load_file(out / "tuned" / "model.safetensors")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight"):
        torch.testing.assert_close(tuned[name], reference[name], atol=1e-5, rtol=0)
    merged = report["steps"][1]["result"]
    assert merged["method"] == "match" and merged["matching"]  # weight matching ran
    assert report["steps"][2]["result"]["layers_after"] == 6
    assert report["steps"][4]["result"]["check"]["passed"]  # ONNX Runtime agrees with the torch forward
    # each step's output feeds the next: the merge reads the fold's output, the stack the merge's
    assert report["steps"][1]["inputs"][0]["from_step"] == "tuned"
    assert report["steps"][2]["inputs"][0] == {"path": str(out / "merged"), "bytes": report["steps"][2]["inputs"][0][
        "bytes"], "from_step": "merged"}
    assert (out / "model.onnx").is_file()
    state = load_file(out / "stacked" / "model.safetensors")
    assert sum(k.endswith("q_proj.weight") for k in state) == 6


def test_second_run_all_cached_and_fast(built):
    recipe, out, _ = built
    before = hashes(out)
    start = time.perf_counter()
    r = run(recipe, out, "--json")
    wall = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    steps = json.loads(r.stdout)["steps"]
    assert [s["status"] for s in steps] == ["cached"] * 5
    assert steps[2]["result"]["layers_after"] == 6  # a cached step reports the result it was built with
    assert all(s["seconds"] < 1.0 for s in steps), [s["seconds"] for s in steps]
    assert wall < 5 * 1.0 + 5, wall  # no step's work ran (startup of the CLI aside)
    assert hashes(out) == before


def test_force_reruns_byte_identical(built):
    recipe, out, _ = built
    before = hashes(out)
    r = run(recipe, out, "--force", "--json")
    assert r.exit_code == 0, r.output
    assert [s["status"] for s in json.loads(r.stdout)["steps"]] == ["ran"] * 5
    assert hashes(out) == before


def test_changed_option_reruns_that_step_and_later(tmp_path, llamas, lora):
    def text(factor):
        return PIPELINE.format(a=llamas["a"], b=llamas["b"], lora=lora, factor=factor).split("  - name: q")[0]

    out = tmp_path / "build"
    r = run(write(tmp_path, text(2)), out)
    assert r.exit_code == 0, r.output
    r = run(write(tmp_path, text(3)), out, "--json")
    assert r.exit_code == 0, r.output
    steps = json.loads(r.stdout)["steps"]
    assert [s["status"] for s in steps] == ["cached", "cached", "ran"]  # its output had a record: stale, rebuilt
    assert steps[2]["result"]["layers_after"] == 9
    # an output the recipe did not write is never replaced without --force
    (out / ".surgery-run" / "stacked.json").unlink()
    r = run(write(tmp_path, text(2)), out)
    assert r.exit_code == 1 and "step 'stacked'" in r.stderr and "--force" in r.stderr


def test_dry_run_plans_and_writes_nothing(tmp_path, llamas, lora):
    recipe = write(tmp_path, PIPELINE.format(a=llamas["a"], b=llamas["b"], lora=lora, factor=2))
    out = tmp_path / "build"
    r = run(recipe, out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert not out.exists()
    assert [s["status"] for s in report["steps"]] == ["planned"] * 5
    first = report["steps"][0]
    size = sum(p.stat().st_size for p in llamas["a"].rglob("*") if p.is_file())
    assert first["inputs"][0] == {"path": str(llamas["a"]), "bytes": size, "from_step": None}
    assert report["steps"][3]["command"] == (
        f"surgery quantize {out / 'stacked'} -o {out / 'q'} --method rtn --bits 4 --format packed --asymmetric")
    assert report["steps"][4]["output"] == str(out / "model.onnx")
    assert report["steps"][0]["command"] == f"surgery fold {llamas['a']} {lora} -o {out / 'tuned'}"
    r = run(recipe, out, "--dry-run")
    assert r.exit_code == 0 and "surgery grow" in r.stdout and not out.exists()


def test_dry_run_table_lists_a_steps_inputs_one_a_line(tmp_path, llamas, lora):
    """The table's inputs cell holds one input a line (the fold step reads the model and the adapter), not the
    escaped newline `\\x0a` between them that printing the joined cell through `safe()` gave."""
    recipe = write(tmp_path, PIPELINE.format(a=llamas["a"], b=llamas["b"], lora=lora, factor=2))
    r = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "build"), "--dry-run"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert "\\x0a" not in r.stdout, r.stdout
    row = next(line for line in r.stdout.splitlines() if "tuned (fold)" in line)
    assert f"{llamas['a']} (" in row and str(lora) not in row
    assert any(f"{lora} (" in line for line in r.stdout.splitlines())


def test_failing_step_is_named_and_earlier_outputs_stay(tmp_path, llamas, lora):
    text = PIPELINE.format(a=llamas["a"], b=llamas["b"], lora=lora, factor=2).replace(
        "options: {method: stack, factor: 2}", "options: {method: stack, layers: '0:99'}")
    recipe = write(tmp_path, text)
    out = tmp_path / "build"
    r = run(recipe, out)
    assert r.exit_code == 1
    assert "step 'stacked' (grow) failed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (out / "stacked").exists() and not (out / "q").exists()
    merged = load_file(out / "merged" / "model.safetensors")  # the earlier step's output is whole
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    r = run(recipe, out, "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert [s["status"] for s in report["steps"]] == ["cached", "cached", "failed"]
    assert report["ok"] is False and "stacked" in report["error"]


@pytest.mark.parametrize("step, named", [
    ("{name: s, run: grow, inputs: [X], options: {factr: 2}}", "'factr' is not an option of surgery grow"),
    ("{name: s, run: grow, inputs: [X], options: {factor: abc}}", "step 's'"),
    ("{name: s, run: grow, inputs: [X], options: {force: true}}", "set by surgery run"),
    ("{name: s, run: shrink, inputs: [X]}", "run 'shrink' is not a surgery command"),
    ("{name: s, run: grow, inputs: [X], extra: 1}", "key 'extra'"),
    ("{name: s, run: quantize, inputs: [X, X]}", "takes one input"),
    ("{name: s, run: inspect, inputs: [X]}", "writes no output"),
    ("{name: s, run: grow, inputs: [X], output: ../up}", "plain name"),
])
def test_bad_steps_refused_before_anything_runs(tmp_path, llamas, step, named):
    recipe = write(tmp_path, "steps:\n  - " + step.replace("X", str(llamas["a"])) + "\n")
    out = tmp_path / "build"
    r = run(recipe, out)
    assert r.exit_code == 1
    assert named in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_first_step_failing_leaves_no_folder(tmp_path, llamas):
    step = f"{{name: s, run: grow, inputs: [{llamas['a']}], options: {{layers: '0:99'}}}}"
    recipe = write(tmp_path, f"steps:\n  - {step}\n")
    out = tmp_path / "build"
    r = run(recipe, out)
    assert r.exit_code == 1 and "step 's' (grow) failed" in r.stderr
    assert not out.exists()


def test_output_over_the_recipe_refused(tmp_path, llamas):
    recipe = write(tmp_path, f"steps:\n  - {{name: s, run: grow, inputs: [{llamas['a']}], output: recipe.yml}}\n")
    r = run(recipe, tmp_path)
    assert r.exit_code == 1 and "would overwrite the recipe" in r.stderr
    assert recipe.read_text().startswith("steps:")


def test_mergekit_step_feeds_a_command_step(tmp_path, llamas):
    text = f"""
steps:
  - name: soup
    run: mergekit
    config:
      merge_method: linear
      models:
        - model: {llamas['a']}
          parameters: {{weight: 1.0}}
        - model: {llamas['b']}
          parameters: {{weight: 3.0}}
  - name: deeper
    run: grow
    inputs: [soup]
    options: {{method: stack, layers: "0:3,1:3"}}
"""
    out = tmp_path / "build"
    r = run(write(tmp_path, text), out, "--json")
    assert r.exit_code == 0, r.output
    steps = json.loads(r.stdout)["steps"]
    assert [s["status"] for s in steps] == ["ran", "ran"]
    a = load_file(llamas["a"] / "model.safetensors")
    b = load_file(llamas["b"] / "model.safetensors")
    got = load_file(out / "deeper" / "model.safetensors")
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(got[name.format(3)], (a[name.format(1)] + 3 * b[name.format(1)]) / 4)
    r = run(write(tmp_path, text), out, "--json")
    assert [s["status"] for s in json.loads(r.stdout)["steps"]] == ["cached", "cached"]


def test_cache_follows_input_contents(tmp_path, llamas):
    import os
    import shutil

    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(llamas["a"], a)
    shutil.copytree(llamas["b"], b)
    recipe = write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                             f"  - model: {b}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "merged"
    status = partial(first_status, recipe, out)

    assert status() == "ran"
    assert status() == "cached"
    os.utime(b / "model.safetensors")  # touched, same bytes: hashed again, still the same input
    assert status() == "cached"
    state = load_file(b / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    assert status() == "ran"  # its record was stale: rebuilt without --force
    merged = load_file(out / "model.safetensors")["model.norm.weight"]
    norm_a = load_file(a / "model.safetensors")["model.norm.weight"]
    torch.testing.assert_close(merged, (norm_a + state["model.norm.weight"]) / 2)
    assert status() == "cached"
    (out / "config.json").write_text("{}")  # an edited output is not the recorded one
    assert status() == "ran"


def test_option_words_follow_the_command_declarations(tmp_path, llamas):
    """Repeatable options take lists, --x/--no-x flags take true/false: as the commands declare them."""
    text = f"""
steps:
  - name: q
    run: quantize
    inputs: [{llamas['a']}]
    options: {{method: flexround, skip: [lm_head, embed_tokens], symmetric: false, low_memory: false}}
  - name: onnx
    run: export
    inputs: [q]
    options: {{check: false, opset: 21}}
    output: m.onnx
"""
    out = tmp_path / "build"
    r = run(write(tmp_path, text), out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    steps = json.loads(r.stdout)["steps"]
    assert steps[0]["command"].endswith("--method flexround --skip lm_head --skip embed_tokens --asymmetric --fast")
    assert steps[1]["command"].endswith("-o " + str(out / "m.onnx") + " --no-check --opset 21")


def test_path_option_names_an_earlier_step(tmp_path, llamas):
    """merge's --base given as a step name; the result is task arithmetic over that step's output."""
    text = f"""
steps:
  - name: b0
    run: mergekit
    config:
      merge_method: passthrough
      slices: [{{sources: [{{model: {llamas['base']}, layer_range: [0, 3]}}]}}]
  - name: ta
    run: merge
    inputs: [{llamas['ft1']}, {llamas['ft2']}]
    options: {{method: task-arithmetic, base: b0, weights: "0.5,0.25"}}
"""
    out = tmp_path / "build"
    r = run(write(tmp_path, text), out, "--json")
    assert r.exit_code == 0, r.output
    steps = json.loads(r.stdout)["steps"]
    assert f"--base {out / 'b0'}" in steps[1]["command"]
    assert any(i["from_step"] == "b0" for i in steps[1]["inputs"])
    base, f1, f2 = (load_file(llamas[k] / "model.safetensors") for k in ("base", "ft1", "ft2"))
    got = load_file(out / "ta" / "model.safetensors")
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        want = base[name] + 0.5 * (f1[name] - base[name]) + 0.25 * (f2[name] - base[name])
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("text, named", [
    (None, "no such recipe file"),
    (": : :\n", "not valid YAML"),
    ("- a\n- b\n", "a recipe is a mapping"),
    ("steps: []\n", "'steps' must be a non-empty list"),
    ("steps: [1]\n", "a step is a mapping"),
    ("jobs: {}\n", "key 'jobs' is not a recipe key"),
    ("steps:\n  - {run: grow}\n", "every step needs a name"),
    ("steps:\n  - {name: x, run: mergekit}\n", "run: mergekit needs 'config:'"),
])
def test_bad_recipe_files(tmp_path, text, named):
    recipe = tmp_path / "recipe.yml"
    if text is not None:
        recipe.write_text(text)
    out = tmp_path / "build"
    r = run(recipe, out)
    assert r.exit_code == 1 and named in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_step_names_print_as_written(tmp_path, llamas, lora):
    """Issue #14 item 3 for `surgery run`: a step name from the recipe is shown, never read as rich markup."""
    text = PIPELINE.format(a=llamas["a"], b=llamas["b"], lora=lora, factor=2).replace(
        "name: tuned", "name: '[white on white]tuned[/]'").replace(
        "inputs: [tuned, ", "inputs: ['[white on white]tuned[/]', ")
    recipe = write(tmp_path, text)
    r = run(recipe, tmp_path / "build", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "[white on white]tuned[/]" in r.stdout and "[dry run]" in r.stdout


def _shards(folder):
    """Every tensor of a folder's shards, read with safetensors, and the shards' provenance records."""
    from safetensors import safe_open

    tensors, records = {}, []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            records.append(json.loads(f.metadata()["modelsurgery"]))
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors, records


def test_writing_options_in_command_and_mergekit_steps(tmp_path, llamas):
    """dtype, max_shard_size and no_input_hash are step options under the commands' own names, on a
    command step and on a mergekit step (where dtype is the config's out_dtype)."""
    writing = "{dtype: bfloat16, max_shard_size: 20KB, no_input_hash: true}"
    text = f"""
steps:
  - name: soup
    run: mergekit
    config:
      merge_method: linear
      models:
        - model: {llamas['a']}
          parameters: {{weight: 1.0}}
        - model: {llamas['b']}
          parameters: {{weight: 1.0}}
    options: {writing}
  - name: deeper
    run: grow
    inputs: [{llamas['a']}]
    options: {{method: stack, factor: 2, dtype: bfloat16, max_shard_size: 20KB, no_input_hash: true}}
"""
    out = tmp_path / "build"
    r = run(write(tmp_path, text), out, "--json")
    assert r.exit_code == 0, r.output
    a = load_file(llamas["a"] / "model.safetensors")
    b = load_file(llamas["b"] / "model.safetensors")
    for step in ("soup", "deeper"):
        tensors, records = _shards(out / step)
        assert len(records) >= 2 and (out / step / "model.safetensors.index.json").is_file()
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert all(r["sources"] == [] and r["parameters"]["inputs_unhashed"] for r in records)
        config = json.loads((out / step / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    soup, _ = _shards(out / "soup")
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(soup[name], ((a[name] + b[name]) / 2).to(torch.bfloat16))
    r = run(write(tmp_path, text), out, "--json")
    assert [s["status"] for s in json.loads(r.stdout)["steps"]] == ["cached", "cached"]


@pytest.mark.parametrize("options, named", [
    ("{method: linear}", "'method' is not an option of a mergekit step"),
    ("{dtype: int8}", "--dtype int8"),
    ("{max_shard_size: lots}", "max shard size 'lots'"),
    ("{no_input_hash: 1}", "'no_input_hash' is true or false"),
    ("{dtype: bfloat16}", "out_dtype: float16"),
])
def test_bad_mergekit_step_options_refused_before_anything_runs(tmp_path, llamas, options, named):
    text = f"""
steps:
  - name: soup
    run: mergekit
    config: {{merge_method: linear, out_dtype: float16, models: [{{model: {llamas['a']}, parameters: {{weight: 1}}}},
             {{model: {llamas['b']}, parameters: {{weight: 1}}}}]}}
    options: {options}
"""
    out = tmp_path / "build"
    r = run(write(tmp_path, text), out)
    assert r.exit_code == 1
    assert named in r.stderr and "step 'soup'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_dry_run_plans_a_rerun_of_every_step_reading_a_stale_one(tmp_path):
    """A changed option reruns that step and the ones that read it: the plan says so, not 'cached' for the
    later step whose input is about to be rebuilt (what the real run then does is the reference)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"0.weight": torch.randn(8, 4, generator=g), "1.weight": torch.randn(6, 8, generator=g)},
              str(tmp_path / "mlp.safetensors"))

    def text(old):
        return f"""
steps:
  - name: a1
    run: align
    inputs: [{tmp_path / 'mlp.safetensors'}]
    options: {{old_classes: {old}, no_clamp: true}}
    output: a1.safetensors
  - name: a2
    run: align
    inputs: [a1]
    options: {{classes: "0:2,2:4"}}
    output: a2.safetensors
"""

    out = tmp_path / "build"
    assert run(write(tmp_path, text(3)), out).exit_code == 0
    recipe = write(tmp_path, text(2))
    r = run(recipe, out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    planned = [s["status"] for s in json.loads(r.stdout)["steps"]]
    r = run(recipe, out, "--json")
    assert r.exit_code == 0, r.output
    assert [s["status"] for s in json.loads(r.stdout)["steps"]] == ["ran", "ran"]
    assert planned == ["planned", "planned"]


def align_step(tmp_path, source, options=""):
    """A one-step recipe aligning ``source`` (old_classes 3, no clamp; ``options`` added to its options) and a
    function that runs it and returns the step's status ("ran" or "cached"); also the output folder."""
    recipe = write(tmp_path, f"steps:\n  - name: al\n    run: align\n    inputs: [{source}]\n"
                             f"    options: {{old_classes: 3, no_clamp: true{options}}}\n    output: al.safetensors\n")
    out = tmp_path / "build"
    return partial(first_status, recipe, out), out


def test_hub_id_input_follows_the_cached_revision(tmp_path, monkeypatch):
    """An input given as a hub id is read from the snapshot its revision names in the local cache: when the
    cache's main moves to another commit (new weights), the step is rebuilt from them, not reported cached."""
    from safetensors.torch import save_file

    from tests.checkpoint.test_hub import REPO, _cache_model

    cache = tmp_path / "hub"
    for seed, commit in ((0, "a" * 40), (1, "c" * 40)):
        g = torch.Generator().manual_seed(seed)
        src = tmp_path / f"src{seed}"
        src.mkdir()
        save_file({"0.weight": torch.randn(8, 4, generator=g), "1.weight": torch.randn(6, 8, generator=g)},
                  str(src / "model.safetensors"))
        _cache_model(cache, src, commit, refs=("main",) if seed == 0 else ())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    status, out = align_step(tmp_path, REPO)
    assert status() == "ran"
    assert status() == "cached"
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("c" * 40)
    assert status() == "ran"
    got = load_file(out / "al.safetensors")["0.weight"]  # the hidden layer is copied: the new commit's
    torch.testing.assert_close(got, load_file(tmp_path / "src1" / "model.safetensors")["0.weight"])


def test_shard_index_input_follows_its_shards(tmp_path):
    """An input given as a shard index is read from its shards: new weights in a shard rebuild the step."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "sharded"
    folder.mkdir()
    tensors = {"0.weight": torch.randn(8, 4, generator=g), "1.weight": torch.randn(6, 8, generator=g)}
    for i, name in enumerate(tensors):
        save_file({name: tensors[name]}, str(folder / f"model-0000{i + 1}-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f"model-0000{i + 1}-of-00002.safetensors" for i, n in enumerate(tensors)}}))
    index = folder / "model.safetensors.index.json"
    status, out = align_step(tmp_path, index)
    assert status() == "ran"
    assert status() == "cached"
    save_file({"0.weight": tensors["0.weight"] + 1}, str(folder / "model-00001-of-00002.safetensors"))
    assert status() == "ran"
    torch.testing.assert_close(load_file(out / "al.safetensors")["0.weight"], tensors["0.weight"] + 1)


def test_model_file_of_a_step_is_an_input(tmp_path):
    """--model path/to/file.py:fn builds the model a step works on: an edited file reruns the step."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"body.weight": torch.randn(8, 4, generator=g), "head.weight": torch.randn(6, 8, generator=g)},
              str(tmp_path / "m.safetensors"))
    code = "from torch import nn\n\ndef make():\n    return nn.Sequential({})\n"
    layers = "collections.OrderedDict(body=nn.Linear(4, 8, bias=False), act=nn.{}(), head=nn.Linear(8, 6, bias=False))"
    model = tmp_path / "net.py"
    model.write_text("import collections\n" + code.format(layers.format("ReLU")))
    status, _ = align_step(tmp_path, tmp_path / "m.safetensors", f", layer: head, model: '{model}:make'")
    assert status() == "ran"
    assert status() == "cached"
    model.write_text("import collections\n" + code.format(layers.format("Tanh")))
    assert status() == "ran"


def test_merge_step_matching_options(tmp_path, llamas):
    """A merge step takes --seed/--backend/--device as the command line does: without them a linear merge runs and
    a matching merge records the defaults (backend auto, seed 0); given to a merge that does not match, the step
    fails naming the option instead of ignoring it."""
    a, b = llamas["a"], llamas["b"]
    recipe = write(tmp_path, f"steps:\n  - {{name: lin, run: merge, inputs: [{a}, {b}], options: {{method: linear}}}}\n"
                             f"  - {{name: m, run: merge, inputs: [{a}, {b}]}}\n")
    out = tmp_path / "build"
    r = run(recipe, out)
    assert r.exit_code == 0, r.output
    recorded = json.loads(Checkpoint.open(out / "m").metadata["modelsurgery"])["parameters"]
    assert (recorded["backend"], recorded["seed"]) == ("auto", 0)
    bad = write(tmp_path, f"steps:\n  - {{name: lin, run: merge, inputs: [{a}, {b}], "
                          "options: {method: linear, seed: 1}}\n", name="bad.yml")
    r = run(bad, tmp_path / "bad")
    assert r.exit_code == 1 and "--seed configures weight matching" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
