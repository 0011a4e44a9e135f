"""Hugging Face hub ids (``org/name[@revision]``) resolved from the local cache, never the network.

The cache layout is huggingface_hub's (its ``snapshot_download(..., local_files_only=True)`` reads it
the same way): ``$HF_HUB_CACHE/models--org--name/refs/<branch or tag>`` holds a commit hash and
``snapshots/<commit>/`` the files, as links into ``blobs/``. The cache folder is ``HF_HUB_CACHE``,
else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` (``HF_HOME`` defaults to
``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelsurgery.errors import SurgeryError

#: org/name with an optional @revision: what the hub accepts as a repo id (letters, digits, - _ .)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache() -> Path:
    """The hub cache folder the environment names (huggingface_hub's rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HUGGINGFACE_HUB_CACHE"])).expanduser()
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                           "huggingface")
    return Path(os.path.expandvars(os.environ.get("HF_HOME") or default)).expanduser() / "hub"


def parse_hub_id(text: str) -> tuple[str, str] | None:
    """('org/name', revision) for a string shaped like a hub id, else None."""
    m = HUB_ID.match(text)
    if m is None or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("revision") or "main"


def repo_folder(repo: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache()) / ("models--" + repo.replace("/", "--"))


def resolve_hub_id(text: str, cache: Path | None = None) -> Path:
    """The cached snapshot folder of hub id ``text``; SurgeryError saying what is missing."""
    parsed = parse_hub_id(text)
    if parsed is None:
        raise SurgeryError(f"{text}: no such file or directory")
    repo, revision = parsed
    cache = cache or hub_cache()
    storage = repo_folder(repo, cache)
    hint = (f"download it first (huggingface-cli download {repo}"
            f"{'' if revision == 'main' else ' --revision ' + revision}) or pass a local folder")
    if not storage.is_dir():
        raise SurgeryError(f"{text}: no such file or directory, and hub model '{repo}' is not in the local "
                           f"Hugging Face cache ({cache}; set HF_HUB_CACHE or HF_HOME to use another); {hint}")
    commit = revision if COMMIT.match(revision) else None
    if commit is None:
        ref = storage / "refs" / revision
        if not ref.is_file():
            raise SurgeryError(f"{text}: hub model '{repo}' is cached ({storage}) but not its revision "
                               f"'{revision}'; {hint}")
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        raise SurgeryError(f"{text}: hub model '{repo}' revision '{revision}' (commit {commit[:12]}) has no "
                           f"snapshot folder in {storage / 'snapshots'}; {hint}")
    return snapshot


def resolve_input(path: Path) -> Path:
    """``path`` if it exists, else the cached snapshot of the hub id it spells (SurgeryError if neither)."""
    if path.exists():
        return path
    return resolve_hub_id(str(path))


def link_root(folder: Path) -> Path:
    """The folder links inside ``folder`` may point into: a cached snapshot's files are links into its
    repository's ``blobs/``, so the repository folder; any other folder itself."""
    resolved = folder.resolve()
    return resolved.parent.parent if _in_snapshots(resolved) else resolved


def _in_snapshots(folder: Path) -> bool:
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def hub_repo_of(folder: Path) -> str | None:
    """The repo id ('org/name') of a cached snapshot folder (``models--org--name/snapshots/<commit>``;
    the hub allows no '--' in an id, so the folder name splits back unambiguously), else None."""
    resolved = folder.resolve()
    return resolved.parent.parent.name.removeprefix("models--").replace("--", "/") if _in_snapshots(resolved) else None
