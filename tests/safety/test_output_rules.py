"""Issue #14 items 4-8: nothing that is not ours is replaced, inputs are never written, every file
written follows the same rules, and the temporaries of dead runs are removed on the next write."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint, atomic_path, check_output, plan_tensor, write_checkpoint
from modelsurgery.checkpoint.output import remove_stale_temporaries, temp_name
from modelsurgery.errors import SurgeryError
from tests.checkpoint.helpers import snapshot


def _tensors(value=0.0, n=4):
    return [plan_tensor(f"w{i}", torch.full((8, 8), value + i)) for i in range(n)]


def _appearing(out: Path, make):
    """A tensor plan whose production creates ``out``: another process claiming the destination while
    this run is writing."""
    def load():
        make(out)
        return torch.zeros(2)
    from modelsurgery.checkpoint import PlannedTensor
    return [PlannedTensor("late", (2,), torch.float32, load)]


def _make_file(p: Path):
    p.write_bytes(b"someone else's file")


def _make_folder(p: Path):
    p.mkdir()
    (p / "theirs.txt").write_text("someone else's folder")


def _make_empty_folder(p: Path):
    p.mkdir()


@pytest.fixture(params=["renameat2", "without_renameat2"])
def final_step(request, monkeypatch):
    """Both ways of the final step: renameat2, and link/lock fallbacks where the libc lacks it."""
    import modelsurgery.checkpoint.output as output

    if request.param == "without_renameat2":
        monkeypatch.setattr(output, "_libc", False)
    return request.param


@pytest.mark.parametrize("name", ["out.safetensors", "out.pt", "out_folder"])
@pytest.mark.parametrize("make", [_make_file, _make_folder, _make_empty_folder])
def test_destination_that_appears_during_the_run_is_never_replaced(tmp_path, name, make, final_step):
    out = tmp_path / name
    with pytest.raises(SurgeryError, match="appeared while this run was writing"):
        write_checkpoint(out, _appearing(out, make))
    expected = tmp_path / "expected"
    make(expected)
    if expected.is_dir():
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected.iterdir())
    else:
        assert out.read_bytes() == expected.read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("name", ["out.safetensors", "out_folder"])
def test_force_replaces_our_own_output(tmp_path, name, final_step):
    out = tmp_path / name
    write_checkpoint(out, _tensors(0.0))
    write_checkpoint(out, _tensors(10.0), force=True)
    assert torch.equal(Checkpoint.open(out).get("w1"), torch.full((8, 8), 11.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_force_never_deletes_a_folder_holding_files_we_did_not_write(tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out, _tensors())
    (out / "user_notes.txt").write_text("precious")
    before = snapshot(tmp_path)
    with pytest.raises(SurgeryError, match="user_notes.txt.*did not write"):
        write_checkpoint(out, _tensors(1.0), force=True)
    assert snapshot(tmp_path) == before


def test_force_never_replaces_a_foreign_folder_or_special_file(tmp_path):
    foreign = tmp_path / "hf"  # a folder another tool wrote: weights without our file list
    foreign.mkdir()
    save_file({"a": torch.zeros(2)}, foreign / "model.safetensors")
    with pytest.raises(SurgeryError, match="did not write"):
        check_output(foreign, force=True)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SurgeryError, match="special file"):
        write_checkpoint(fifo, _tensors(), force=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(SurgeryError, match="symbolic link"):
        check_output(link, force=True)
    file_for_folder = tmp_path / "notes"
    file_for_folder.write_text("a file where a folder output would go")
    with pytest.raises(SurgeryError, match="is a file but the output is a folder"):
        write_checkpoint(file_for_folder, _tensors(), force=True)
    assert file_for_folder.read_text().startswith("a file")
    if Path("/dev/null").exists():
        with pytest.raises(SurgeryError, match="special file"):
            check_output(Path("/dev/null"), force=True, folder=False)


def test_carried_files_listed_so_force_can_replace_a_folder_with_a_tokenizer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    save_file({"a": torch.zeros(2)}, src / "model.safetensors")
    ckpt = Checkpoint.open(src)
    out = tmp_path / "out"
    write_checkpoint(out, [plan_tensor("a", ckpt.get("a"))], extra_files=ckpt.extra_files(), config={"x": 1})
    write_checkpoint(out, [plan_tensor("a", torch.ones(2))], extra_files=ckpt.extra_files(), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("inside", [False, True])
def test_output_never_equal_to_inside_or_above_an_input(tmp_path, inside):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "x"}')
    save_file({"a": torch.zeros(2)}, folder / "model.safetensors")
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": torch.zeros(2, 2)}, calib)
    ckpt = Checkpoint.open(folder)
    for out, inputs in [(folder / "sub", [ckpt]), (folder / "x.safetensors", [ckpt.path]),  # file in an HF folder
                        (calib, [ckpt, calib]), (tmp_path / "model" / ".." / "calib.safetensors", [calib]),
                        (tmp_path, [ckpt])]:  # the output would contain the input
        for force in (False, True):
            with pytest.raises(SurgeryError, match="would overwrite the input"):
                check_output(out, force, inputs)
    link = tmp_path / "alias"
    link.symlink_to(folder)
    with pytest.raises(SurgeryError, match="would overwrite the input"):
        check_output(link / "out.safetensors", True, [folder])


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_output_that_names_no_file(tmp_path, bad, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SurgeryError, match="names no file or folder"):
        write_checkpoint(Path(bad), _tensors(), force=True)
    assert list(tmp_path.iterdir()) == []


def test_parent_that_is_not_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SurgeryError, match="is not a folder"):
        write_checkpoint(f / "out.safetensors", _tensors())


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_temporaries_of_dead_owners_are_removed_on_the_next_write(tmp_path):
    dead = tmp_path / f".out.safetensors.tmp-{_dead_pid()}-12345"
    dead.mkdir()
    (dead / "out.safetensors").write_bytes(b"\0" * 1000)
    reused_pid = tmp_path / f".other.tmp-{os.getpid()}-1"  # our pid, another start time: a dead owner
    reused_pid.mkdir()
    live = temp_name(tmp_path / "live")  # this live process's own temporary
    live.mkdir()
    unrelated = tmp_path / ".cache"
    unrelated.mkdir()
    write_checkpoint(tmp_path / "out.safetensors", _tensors())
    assert not dead.exists() and not reused_pid.exists()
    assert live.exists() and unrelated.exists()
    assert remove_stale_temporaries(tmp_path) == []


def test_failure_and_interruption_leave_nothing(tmp_path):
    def boom():
        raise KeyboardInterrupt
    from modelsurgery.checkpoint import PlannedTensor
    for name in ("out.safetensors", "out"):
        with pytest.raises(KeyboardInterrupt):
            write_checkpoint(tmp_path / name, [*_tensors(), PlannedTensor("x", (1,), torch.float32, boom)])
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_for_other_files(tmp_path):
    out = tmp_path / "plot.png"
    out.write_bytes(b"old plot")
    with pytest.raises(SurgeryError, match="already exists"), atomic_path(out, False, is_dir=False) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"old plot"
    with atomic_path(out, True, is_dir=False) as tmp:
        tmp.write_bytes(b"new plot")
    assert out.read_bytes() == b"new plot" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_plot_path_checked_before_work(tmp_path):
    pytest.importorskip("matplotlib")
    from modelsurgery.ops.merge.plot import check_plot

    existing = tmp_path / "p.png"
    existing.write_bytes(b"keep")
    with pytest.raises(SurgeryError, match="already exists"):
        check_plot(existing, 2, 3)
    with pytest.raises(SurgeryError, match="output folder does not exist"):
        check_plot(tmp_path / "nodir" / "p.png", 2, 3)
    check_plot(existing, 2, 3, force=True)


def test_sigterm_handler_interrupts_like_ctrl_c(tmp_path):
    from modelsurgery.cli.common import Terminated, handle_sigterm

    old = signal.getsignal(signal.SIGTERM)
    try:
        handle_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    finally:
        signal.signal(signal.SIGTERM, old)
    assert isinstance(Terminated(), KeyboardInterrupt)  # so every `except KeyboardInterrupt` cleanup runs


def test_write_respects_max_shard_size_bounds(tmp_path):
    with pytest.raises(SurgeryError, match="at least 1 byte"):
        write_checkpoint(tmp_path / "o", _tensors(), max_shard_size="0")
    assert list(tmp_path.iterdir()) == []


def test_data_less_tensors_are_never_written(tmp_path):
    for bad in (torch.empty(2, 2, device="meta"), torch.eye(2).to_sparse()):
        with pytest.raises(SurgeryError, match="no dense data"):
            write_checkpoint(tmp_path / "o.safetensors", [plan_tensor("w", bad)])
        with pytest.raises(SurgeryError, match="no dense data"):
            write_checkpoint(tmp_path / "o.pt", [plan_tensor("w", bad)])
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_adapter_folder_we_wrote(tmp_path):
    """Folder outputs other than model shards (a PEFT adapter) list their files too."""
    from modelsurgery.checkpoint import Provenance
    from modelsurgery.ops.adapters.peft_format import write_lora_adapter

    out = tmp_path / "adapter"
    for value in (0.0, 1.0):
        write_lora_adapter(out, [plan_tensor("w", torch.full((2,), value))], {"r": 1}, Provenance("extract"),
                           force=value > 0)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="notes.txt"):
        write_lora_adapter(out, [plan_tensor("w", torch.ones(2))], {"r": 1}, Provenance("extract"), force=True)


def test_output_name_too_long_is_one_error(tmp_path):
    with pytest.raises(SurgeryError, match="output name too long"):
        write_checkpoint(tmp_path / ("x" * 240 + ".safetensors"), _tensors())
    write_checkpoint(tmp_path / ("y" * 190 + ".safetensors"), _tensors())  # room left for the temporary
    assert len(list(tmp_path.iterdir())) == 1


def test_the_final_step_and_the_allocator_calls_start_no_process(tmp_path):
    """Finding libc with ``ctypes.util.find_library`` forks ``ldconfig -p``: the child shows the parent's anonymous
    memory until it execs, so a multi-GB process is briefly there twice (bench_memory counted it). The writer's
    renameat2 and the allocator's malloc_trim/mallopt come from the process's own symbols: a fresh process in
    which starting any process fails still writes through renameat2 and trims."""
    import subprocess
    import sys

    code = (
        "import subprocess, torch\n"
        "def refuse(*a, **k): raise AssertionError('a process was started')\n"
        "subprocess.Popen.__init__ = refuse\n"
        "from modelsurgery.checkpoint import output, plan_tensor, write_checkpoint\n"
        "from modelsurgery.memory import large_allocations_mapped, release_freed_memory\n"
        f"write_checkpoint({str(tmp_path / 'a.safetensors')!r}, [plan_tensor('w', torch.ones(3))])\n"
        "assert output._libc not in (None, False), output._libc\n"
        "assert release_freed_memory()\n"
        "with large_allocations_mapped() as mapped: assert mapped\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.safetensors").exists()
