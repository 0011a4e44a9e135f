"""`surgery run` reports each step's progress under the step's name and number, besides the step counter:
a mergekit config's merge counts every output tensor (read back with safetensors), a command step's
tasks (here grow's writing) arrive from inside the command, which runs with --json."""

from __future__ import annotations

from modelsurgery.cli.run import _Commands
from modelsurgery.recipe import RunOptions, run_recipe
from tests.progress_record import Recorder, tensors_in


def test_mergekit_config_and_steps_report_per_step(tmp_path, llamas):
    recipe = tmp_path / "pipeline.yml"
    recipe.write_text(f"""
steps:
  - name: mixed
    run: mergekit
    config:
      models:
        - model: {llamas['a']}
          parameters: {{weight: 0.5}}
        - model: {llamas['b']}
          parameters: {{weight: 0.5}}
      merge_method: linear
  - name: deeper
    run: grow
    inputs: [mixed]
    options: {{method: stack, factor: 2}}
""")
    rec = Recorder()
    run_recipe(recipe, tmp_path / "build", _Commands(), RunOptions(), rec)
    rec.finished("step 1/2 mixed: merge", tensors_in(tmp_path / "build" / "mixed"))
    rec.finished("step 2/2 deeper: write", tensors_in(tmp_path / "build" / "deeper"))
    assert rec.finished("recipe", 2) == [0, 1, 2]
    tasks = [task for task, *_ in rec.calls]
    assert tasks.index("step 2/2 deeper: write") > tasks.index("step 1/2 mixed: merge")

    config = tmp_path / "merge.yml"  # a mergekit config as it is: one step
    config.write_text(f"models:\n  - model: {llamas['a']}\n  - model: {llamas['b']}\nmerge_method: linear\n"
                      "parameters: {weight: 0.5}\n")
    rec = Recorder()
    run_recipe(config, tmp_path / "merged", _Commands(), RunOptions(), rec)
    rec.finished("step 1/1 merge: merge", tensors_in(tmp_path / "merged"))
