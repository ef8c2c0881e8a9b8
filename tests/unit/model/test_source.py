"""Finding a model as users keep it: hub ids and revisions in a real cache layout, folders, a partial cache."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub.constants
import pytest

from server.errors import StartupError
from server.model.source import refuse_early, resolve_model
from tests.conftest import TINY
from tools.checkpoint import write_tiny_nomic
from tools.hub_layouts import REPO_ID, fake_commit, write_hf_cache

OLD, NEW = fake_commit("2024"), fake_commit("2026")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_nomic(tmp_path_factory.mktemp("ckpt"), **TINY)


@pytest.fixture
def cache(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_hf_cache(tmp_path / "hf", checkpoint, commit=OLD, refs={"v1.5-2024": OLD})
    write_hf_cache(tmp_path / "hf", checkpoint, commit=NEW, refs={"main": NEW})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize(("revision", "commit"), [(None, NEW), ("main", NEW), ("v1.5-2024", OLD), (OLD, OLD),
                                                  (OLD[:7], OLD), (OLD.upper(), OLD), (NEW[:12].upper(), NEW)])
def test_revisions_users_type_resolve_to_the_cached_commit(cache: Path, revision: str | None, commit: str) -> None:
    source = resolve_model(REPO_ID, revision)
    assert source.revision == commit and source.path.name == commit


def test_a_snapshot_folder_passed_as_a_directory_is_its_commit(cache: Path) -> None:
    snapshot = next((cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots").glob(OLD))
    assert resolve_model(str(snapshot), OLD[:7]).revision == OLD
    with pytest.raises(StartupError, match="records commit"):
        resolve_model(str(snapshot), NEW[:7])


def test_the_cache_repo_folder_itself_says_how_to_pass_it(cache: Path) -> None:
    with pytest.raises(StartupError, match="pass the hub id"):
        resolve_model(str(cache / f"models--{REPO_ID.replace('/', '--')}"))


def test_a_partial_cache_is_completed_by_a_download_where_downloads_are_on(cache: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot holding only the tokenizer files (what AutoTokenizer caches) must not end the search."""
    snapshot = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / NEW
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(StartupError, match="lacks"):  # offline: nothing else to try, and it says what is missing
        resolve_model(REPO_ID)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StartupError, match="downloading them did not succeed"):  # online: it was tried
        resolve_model(REPO_ID)


@pytest.mark.parametrize(("model", "words"), [
    ("~no-such-user-5d1f/model", "cannot be looked up as a local path"),
    ("a" * 300, "cannot be looked up as a local path"),  # longer than a file name may be
    ("/tmp/" + "b" * 300 + "/model", "cannot be looked up as a local path"),
])
def test_a_name_the_system_cannot_look_up_is_one_clear_error(model: str, words: str) -> None:
    for check in (refuse_early, resolve_model):
        with pytest.raises(StartupError, match=words):
            check(model)


def test_the_early_check_leaves_a_hub_id_to_download_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads on: a hub id is resolved later, with the port answering health checks; nothing is refused now."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    refuse_early("nomic-ai/not-downloaded-here")


def test_a_dangling_link_is_a_missing_directory_not_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").symlink_to(tmp_path / "gone")
    monkeypatch.chdir(tmp_path)
    for check in (refuse_early, resolve_model):
        with pytest.raises(StartupError, match="'model' does not exist"):
            check("model")


def test_a_cache_of_a_tag_alone_names_the_tag(checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --revision the hub's default, main, is looked up: the error says which revisions the cache holds."""
    write_hf_cache(tmp_path / "hf", checkpoint, commit=OLD, refs={"v1.0": OLD})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StartupError, match=re.escape("The cache holds it at v1.0: pass --revision v1.0")):
        resolve_model(REPO_ID)
    assert resolve_model(REPO_ID, "v1.0").revision == OLD
