"""Output rules for every file or folder the tool writes.

1. Checked before any work (``check_output``): a usable name, an existing parent folder, never equal
   to, inside, or above an input, and an existing destination only with ``force`` and only when it is
   something this tool could have written (a regular file of the output's kind, or a folder of
   checkpoint files that our own provenance lists).
2. Written under a temporary name beside the destination (``atomic_path``):
   ``.NAME.tmp-PID-START`` where START is the owner's process start time, so a later run can tell a
   dead owner's leftovers from a live writer's and remove them.
3. Moved into place in one step that cannot replace anything that appeared meanwhile:
   ``renameat2(RENAME_NOREPLACE)`` (``os.link`` then unlink for files where it is missing); with
   ``force``, ``renameat2(RENAME_EXCHANGE)`` swaps the new output with the old one, which is then
   deleted, so at every instant the destination holds either the old or the new output.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modelsurgery.errors import SurgeryError

#: metadata key listing the files of a folder output, so ``--force`` can tell our folders from others
FILES_KEY = "modelsurgery.files"
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: what the temporary's name adds to the output's: "." + ".tmp-" + pid + "-" + start time (<= 20 digits each)
TMP_SUFFIX_BYTES = 1 + 5 + 20 + 1 + 20
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)-(\d+)$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def output_is_folder(out: Path) -> bool:
    return not Path(out).name.endswith(FILE_SUFFIXES)


# ----- checks before any work ---------------------------------------------------------------------
def _protected(item) -> list[Path]:
    """The paths one input stands for: a Checkpoint's folder and files, or a path (a file inside a
    checkpoint folder protects the folder too)."""
    if hasattr(item, "input_paths"):
        return list(item.input_paths())
    p = Path(item)
    out = [p]
    if p.is_file() and ((p.parent / "config.json").is_file() or p.name.endswith(".index.json")):
        out.append(p.parent)
    return out


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(out: str | Path, force: bool, inputs: Iterable = (), *, folder: bool | None = None) -> None:
    """Refuse before any work is done: a name that is no file or folder, a missing parent, an output
    equal to, inside or above any input (checkpoints, data files, adapters, recipes: Paths or
    Checkpoints), and an existing destination without ``force`` (or one ``force`` may not replace)."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise SurgeryError(f"output '{out}': names no file or folder; give a new file or folder name")
    parent = out.parent
    out_r = parent.resolve() / out.name
    for item in inputs:
        for p in _protected(item):
            p_r = Path(p).resolve()
            if _within(out_r, p_r) or _within(p_r, out_r):
                where = "" if out_r == p_r else (" (it lies inside it)" if _within(out_r, p_r) else
                                                 " (it contains it)")
                raise SurgeryError(f"{out}: output would overwrite the input {p}{where}; inputs are never "
                                   "written, choose another path")
    if not parent.exists():
        raise SurgeryError(f"{parent}: output folder does not exist")
    if not parent.is_dir():
        raise SurgeryError(f"{parent}: is not a folder, cannot write {out.name} in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SurgeryError(f"{parent}: output folder is not writable")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = name_max - TMP_SUFFIX_BYTES  # the temporary beside it is named .NAME.tmp-PID-START
    if len(os.fsencode(out.name)) > longest:
        raise SurgeryError(f"{out.name[:40]}...: output name too long ({len(os.fsencode(out.name))} bytes; at most "
                           f"{longest} here)")
    remove_stale_temporaries(parent)
    if os.path.lexists(out):
        if not force:
            raise SurgeryError(f"{out}: already exists (use --force to replace it)")
        check_replaceable(out, output_is_folder(out) if folder is None else folder)


def check_replaceable(out: Path, folder: bool) -> None:
    """What ``--force`` may replace: a regular file for a file output; for a folder output, a folder of
    regular files that are all listed by our own provenance (or an empty folder)."""
    st = os.lstat(out)
    if stat.S_ISLNK(st.st_mode):
        raise SurgeryError(f"{out}: is a symbolic link; --force replaces only files and folders this tool "
                           "writes (remove the link yourself)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SurgeryError(f"{out}: is a special file (device, FIFO or socket); refusing to replace it")
    if stat.S_ISDIR(st.st_mode) != folder:
        have, want = ("a folder", "a file") if stat.S_ISDIR(st.st_mode) else ("a file", "a folder")
        raise SurgeryError(f"{out}: is {have} but the output is {want}; refusing to replace it")
    if not folder:
        return
    entries = list(os.scandir(out))
    if not entries:
        return
    listed = written_files(out)
    names = [n for e in entries for n in _plain_files(e, e.name, out, listed)]
    foreign = sorted(n for n in names if n not in listed)
    if foreign:
        raise SurgeryError(f"{out}: holds {foreign[0]!r}, which this tool did not write there; --force "
                           "replaces only checkpoint folders this tool wrote (move it or remove the folder)")


def _plain_files(entry: os.DirEntry, name: str, out: Path, listed: set[str]) -> list[str]:
    """The plain files ``entry`` of a folder output stands for, as "sub/file" inside a sub-folder (carried
    ones such as sentence-transformers' 1_Pooling/); anything but files and folders is refused."""
    if entry.is_file(follow_symlinks=False):
        return [name]
    if not entry.is_dir(follow_symlinks=False):
        raise SurgeryError(f"{out}: holds {name!r}, which is not a plain file; --force replaces only "
                           "checkpoint folders this tool wrote")
    if not any(n.startswith(f"{name}/") for n in listed):
        return [f"{name}/"]  # a folder we did not write (or an empty one): not walked, not ours
    inner = [n for e in os.scandir(entry.path) for n in _plain_files(e, f"{name}/{e.name}", out, listed)]
    return inner or [f"{name}/"]


def written_files(folder: Path) -> set[str]:
    """Files a folder output of ours lists in the ``modelsurgery.files`` metadata of its safetensors
    (model shards, adapters); empty when none does."""
    from modelsurgery.checkpoint.formats import read_safetensors_header

    for f in sorted(folder.glob("*.safetensors")):
        try:
            _, metadata = read_safetensors_header(f)
            names = json.loads(metadata[FILES_KEY]) if FILES_KEY in metadata else None
        except (SurgeryError, ValueError):
            continue
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return set(names)
    return set()


# ----- temporaries --------------------------------------------------------------------------------
def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None when there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        if os.path.isdir("/proc/self"):
            return None
        try:  # no procfs: fall back to "a process with that pid exists"
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
        return 0


def temp_name(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{_start_time(os.getpid()) or 0}"


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-START`` entries in ``parent`` whose owner is no longer running."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if not m:
            continue
        pid, start = int(m.group(1)), int(m.group(2))
        alive = _start_time(pid)
        if alive is not None and (alive == start or alive == 0 or start == 0):
            continue
        path = parent / name
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                continue
        removed.append(path)
    return removed


# ----- the final step -----------------------------------------------------------------------------
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 with ``flags``; False when the system or file system does not offer it."""
    global _libc
    if _libc is None:
        try:
            # the process's own symbols, libc's among them: ``ctypes.util.find_library`` forks ``ldconfig -p``,
            # whose child shows the parent's anonymous memory until it execs (a multi-GB process counted twice)
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 (missing before glibc 2.28)
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Serialise final steps of our own writers in one folder (fallback when renameat2 is missing)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _appeared(out: Path) -> SurgeryError:
    return SurgeryError(f"{out}: appeared while this run was writing (another process?); left it alone, "
                        "nothing was written (use --force to replace it)")


def move_into_place(new: Path, out: Path, force: bool, old_slot: Path) -> None:
    """Move ``new`` to ``out`` without ever replacing something that appeared meanwhile; with
    ``force``, swap atomically with the existing output and put the old one at ``old_slot``."""
    folder = new.is_dir()
    try:
        if _renameat2(new, out, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        if not force:
            raise _appeared(out) from None
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        if not force:
            raise _appeared(out) from None
    else:  # no renameat2 here
        if not folder and not os.path.lexists(out):
            try:
                os.link(new, out)
                os.unlink(new)
                return
            except FileExistsError:
                if not force:
                    raise _appeared(out) from None
            except OSError:
                pass
        if not force:
            with _parent_lock(out.parent):
                if os.path.lexists(out):
                    raise _appeared(out)
                os.rename(new, out)
            return
    # force, and the destination exists: replace only what we may, in one step where possible
    check_replaceable(out, folder)
    if _renameat2(new, out, _RENAME_EXCHANGE):
        os.rename(new, old_slot)  # ``new`` now names the old output
        return
    with _parent_lock(out.parent):
        os.rename(out, old_slot)
        os.rename(new, out)


@contextmanager
def atomic_path(out: str | Path, force: bool, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` (a new folder when ``is_dir``); on success move it into
    place (see ``move_into_place``); on failure or interruption remove it."""
    out = Path(out)
    check_output(out, force, folder=is_dir)
    tmp_root = temp_name(out)
    try:
        os.mkdir(tmp_root)
    except FileExistsError:  # left by this very process (an earlier write in the same run)
        shutil.rmtree(tmp_root, ignore_errors=True)
        os.mkdir(tmp_root)
    tmp = tmp_root / out.name
    try:
        if is_dir:
            tmp.mkdir()
        yield tmp
        move_into_place(tmp, out, force, tmp_root / (out.name + ".old"))
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
