"""`--model` lookup: 'pkg.mod:fn' from the package's parent folder (the current folder is searched first, as
`python -m` does, even from the `surgery` console script, whose path does not hold it) and 'file.py:fn'."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

MODELS = textwrap.dedent("""
    from torch import nn
    from mypkg.sizes import HIDDEN

    def make():
        return nn.Sequential(nn.Linear(4, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 3))
""")


@pytest.fixture
def project(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sizes.py").write_text("HIDDEN = 5\n")
    (pkg / "models.py").write_text(MODELS)
    torch.manual_seed(0)
    state = {"0.weight": torch.randn(5, 4), "0.bias": torch.randn(5), "2.weight": torch.randn(3, 5),
             "2.bias": torch.randn(3)}
    save_file(state, tmp_path / "m.safetensors")
    return tmp_path


def _surgery(cwd, *args):
    # -P: the current folder is NOT on sys.path, as for the installed `surgery` script
    code = "import sys; from modelsurgery.cli.app import main; sys.argv = ['surgery', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-P", "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_package_from_its_parent_folder_and_file_path(project):
    r = _surgery(project, "inspect", "m.safetensors", "--model", "mypkg.models:make", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "custom"
    r = _surgery(project / "mypkg", "inspect", "../m.safetensors", "--model", "models.py:make", "--json")
    assert r.returncode == 1 and "No module named 'mypkg'" in r.stderr  # models.py imports its package
    r = _surgery(project.parent, "inspect", f"{project.name}/m.safetensors", "--model",
                 f"{project.name}/mypkg/sizes.py:HIDDEN")
    assert r.returncode == 1 and "no function 'HIDDEN'" in r.stderr


def test_file_path_factory(project):
    (project / "standalone.py").write_text("from torch import nn\n\ndef make():\n"
                                           "    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))\n")
    r = _surgery(project.parent, "inspect", f"{project.name}/m.safetensors", "--model",
                 f"{project.name}/standalone.py:make", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "custom"
    r = _surgery(project, "inspect", "m.safetensors", "--model", "nowhere.py:make")
    assert r.returncode == 1 and "nowhere.py: no such file" in r.stderr and len(r.stderr.splitlines()) == 1


def test_not_found_says_where_it_looked(project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    r = _surgery(elsewhere, "inspect", str(project / "m.safetensors"), "--model", "mypkg.models:make")
    assert r.returncode == 1 and f"looked in {elsewhere}" in " ".join(r.stderr.split())
