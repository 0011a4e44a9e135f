"""Issue #14 item 3: text from files and users is printed as written, never as rich markup, emoji codes
or terminal control sequences, and never crashes the printer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.cli.common import plain, safe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]

HOSTILE_NAMES = {
    "[white on white]evil[/]": "[white on white]evil[/]",
    "clear\x1b[2Jscreen": "clear\\x1b[2Jscreen",
    "row\nerror: fake message": "row\\x0aerror: fake message",
    "close[/bold]tag": "close[/bold]tag",
    "close[/y]tag": "close[/y]tag",
    "emoji:b:code": "emoji:b:code",
    "bell\x07rtl\u202eeman": "bell\\x07rtl\\u202eeman",
}


def test_plain_and_safe_by_hand():
    assert plain("a\x1b[2Jb\nc\ud800") == "a\\x1b[2Jb\\x0ac\\ud800"
    assert safe("[bold]x[/]") == "\\[bold]x\\[/]"


def test_inspect_prints_hostile_tensor_names_as_written(tmp_path):
    path = tmp_path / "names.safetensors"
    save_file({name: torch.zeros(1) for name in HOSTILE_NAMES}, path, metadata={"note": "[red]x[/red] :b:"})
    res = runner.invoke(app, ["inspect", str(path), "--all"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    for shown in HOSTILE_NAMES.values():
        assert shown in out, (shown, out)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\U0001f171" not in out  # the emoji :b: would become
    assert "[red]x[/red] :b:" in out
    assert not any(line.lstrip().startswith("error: fake") for line in out.splitlines())


def test_hostile_path_in_an_error_is_one_escaped_line(tmp_path):
    (tmp_path / "[").mkdir()  # so that the path holds '[/bold]'
    bad = tmp_path / "[" / "bold] x\x1b[2J\nerror: fake :b:.safetensors"
    bad.write_bytes(b"\x01")
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "[/bold] x\\x1b[2J\\x0aerror: fake :b:" in lines[0]


def test_model_option_with_colons_prints_no_emoji(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 2)}, path)
    res = runner.invoke(app, ["inspect", str(path), "--model", "a:b:c"])
    assert "\U0001f171" not in res.output
    assert "a:b:c" in res.output or res.exit_code == 0


def test_lone_surrogate_file_name_prints_without_crashing(tmp_path):
    """A file name that is not valid UTF-8 reaches Python as a lone surrogate; printing it must not
    raise UnicodeEncodeError (checked in a real process with a UTF-8 stdout)."""
    folder = os.fsencode(tmp_path)
    os.mkdir(folder + b"/[")
    name = folder + b"/[/y]bad\xff.safetensors"  # '[/y]' crashed rich with MarkupError
    save_file({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
    os.rename(tmp_path / "w.safetensors", name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "modelsurgery", "inspect", os.fsdecode(name)],
                         capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert b"[/y]bad\\udcff.safetensors" in res.stdout


def test_progress_bar_shows_hostile_names_as_written(monkeypatch):
    import io

    from rich.console import Console

    from modelsurgery.cli import common

    buf = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf, force_terminal=True, emoji=False, highlight=False))
    with common.progress_bar() as progress:  # a MarkupError here before
        progress("quantize [/bold]", 1, 2, {"tensor": "a[/y]\x1b[2J"})
    assert "quantize [/bold]" in buf.getvalue() and "tensor=a[/y]\\x1b[2J" in buf.getvalue()
