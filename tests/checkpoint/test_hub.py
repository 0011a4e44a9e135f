"""Hub ids resolved from the local Hugging Face cache, without network. The reference is huggingface_hub
itself: its ``snapshot_download(local_files_only=True)`` on the same cache, and its cache-folder rule
(``huggingface_hub.constants.HF_HUB_CACHE``) computed in a fresh interpreter with the same environment."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from modelsurgery.checkpoint.hub import hub_cache, resolve_hub_id
from modelsurgery.cli.app import app
from modelsurgery.errors import SurgeryError
from tests.hf_tiny import save_tiny_gpt2

REPO = "tiny-org/tiny-gpt2"
COMMIT_MAIN, COMMIT_OLD = "a" * 40, "b" * 40


def _cache_model(cache, files_from, commit, refs=()):
    """Lay ``files_from`` out as huggingface_hub does: blobs named by content hash, snapshot links."""
    storage = cache / ("models--" + REPO.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(files_from.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (storage / "blobs" / digest).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", digest))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    src = save_tiny_gpt2(root / "src")
    (src / "tokenizer_config.json").write_text("{}")
    cache = root / "hub"
    _cache_model(cache, src, COMMIT_MAIN, refs=("main",))
    old = save_tiny_gpt2(root / "old", n_layer=2)
    _cache_model(cache, old, COMMIT_OLD, refs=("v1",))
    return cache


@pytest.mark.parametrize("revision", [None, "v1", COMMIT_OLD])
def test_same_snapshot_as_huggingface_hub(cache, revision):
    from huggingface_hub import snapshot_download

    text = REPO if revision is None else f"{REPO}@{revision}"
    ours = resolve_hub_id(text, cache)
    theirs = snapshot_download(REPO, revision=revision, cache_dir=cache, local_files_only=True)
    assert ours == type(ours)(theirs)


@pytest.mark.parametrize("env", [{"HF_HOME": "/tmp/x-home"}, {"HF_HUB_CACHE": "/tmp/x-hub"},
                                 {"HUGGINGFACE_HUB_CACHE": "/tmp/legacy"}, {"XDG_CACHE_HOME": "/tmp/xdg"},
                                 {"HF_HOME": "/tmp/h", "HF_HUB_CACHE": "/tmp/wins"}])
def test_cache_folder_rule_is_huggingface_hubs(monkeypatch, env):
    for k in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    theirs = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert str(hub_cache()) == theirs


def test_cli_inspects_and_writes_from_a_hub_id(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", REPO, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_layers"] == 3
    r = runner.invoke(app, ["inspect", f"{REPO}@v1", "--json"])
    assert json.loads(r.stdout)["num_layers"] == 2
    r = runner.invoke(app, ["quantize", REPO, "-o", str(tmp_path / "q"), "--method", "rtn", "-q"])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output  # the snapshot's links into blobs/ are its own files
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()


def test_hub_inputs_hashed_early_are_the_blobs_named_by_their_sha256(cache, monkeypatch, tmp_path):
    """The CLI starts hashing a hub id's weight file (a snapshot link into blobs/) before the command
    runs; the provenance's digest of it is the blob's own name, which is its content's sha256 as in
    huggingface_hub's cache (LFS files)."""
    from safetensors import safe_open

    from modelsurgery.checkpoint.store import weight_files
    from modelsurgery.cli.app import prefetch_input_digests

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (weights,) = weight_files(REPO)
    assert weights.is_symlink() and weights.resolve().parent.name == "blobs"
    out = tmp_path / "q.safetensors"
    args = [REPO, "-o", str(out), "--method", "rtn", "-q"]
    assert prefetch_input_digests("quantize", args) == [weights]
    r = CliRunner().invoke(app, ["quantize", *args])
    assert r.exit_code == 0, r.output
    with safe_open(str(out), framework="pt") as f:
        (source,) = json.loads(f.metadata()["modelsurgery"])["sources"]
    assert source["sha256"] == weights.resolve().name


@pytest.mark.parametrize("text,words", [
    ("nobody/nothing", "hub model 'nobody/nothing' is not in the local Hugging Face cache"),
    (f"{REPO}@v9", "is cached"),
    (f"{REPO}@{'c' * 40}", "has no snapshot folder"),
])
def test_not_cached_is_one_clear_line(cache, monkeypatch, text, words):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(SurgeryError, match="download it first"):
        resolve_hub_id(text)
    r = CliRunner().invoke(app, ["inspect", text])
    assert r.exit_code == 1 and words in " ".join(r.output.split()) and len(r.output.strip().splitlines()) == 1


def test_plain_missing_path_message_unchanged(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 1 and "no such file or directory" in r.output and "hub" not in r.output


def test_sharded_model_in_the_cache_is_read(tmp_path, monkeypatch):
    """A model above the shard size is cached as an index and shards, each a link into the repository's
    blobs/ (outside the snapshot folder): read as huggingface_hub lays it out, the tensors transformers wrote.
    A shard linked out of the repository folder is still refused."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelsurgery.checkpoint import Checkpoint

    src = tmp_path / "src"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        src, max_shard_size="10KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    cache = tmp_path / "hub"
    _cache_model(cache, src, COMMIT_MAIN, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    want = {k: v for s in shards for k, v in load_file(s).items()}
    for ref in (REPO, snapshot):
        ckpt = Checkpoint.open(ref)
        assert sorted(ckpt.keys()) == sorted(want)
        for k, v in want.items():
            assert ckpt.get(k).equal(v)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shards[0].read_bytes())
    link = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_MAIN / shards[0].name
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(SurgeryError, match="outside the checkpoint folder"):
        Checkpoint.open(REPO)
