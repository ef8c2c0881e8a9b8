"""Find a model's files: a local directory, the Hugging Face cache, or a download where a network exists."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError

from server.errors import StartupError

log = logging.getLogger(__name__)

# Only what serving needs: the hub repos also hold ONNX exports and other large extras.
_ALLOW = ["*.json", "*.safetensors", "vocab.txt", "tokenizer*", "special_tokens_map.json", "*/config.json"]


def resolve_model_dir(model: str) -> Path:
    """Return a local directory holding `model` (a directory path or a hub id)."""
    path = Path(model).expanduser()
    if path.is_dir():
        _require_files(path, model)
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise StartupError(f"model directory {model!r} does not exist (or is not a directory)")
    try:
        local = snapshot_download(model, allow_patterns=_ALLOW, local_files_only=True)
        log.info("model %s found in the Hugging Face cache: %s", model, local)
    except HFValidationError as exc:
        raise StartupError(f"{model!r} is neither a directory nor a valid hub id: {exc}") from None
    except Exception:
        log.info("model %s is not in the Hugging Face cache; downloading it", model)
        try:
            local = snapshot_download(model, allow_patterns=_ALLOW)
        except Exception as exc:  # offline, unknown repo, gated repo, ...
            raise StartupError(
                f"model {model!r} was not found in the Hugging Face cache and could not be downloaded "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Fix: pass "
                f"--model /path/to/dir (a directory with config.json, model.safetensors and the tokenizer "
                f"files), or run `hf download {model}` on a machine with network access and "
                f"copy the cache (HF_HOME) here."
            ) from None
    path = Path(local)
    _require_files(path, model)
    return path


def _require_files(path: Path, model: str) -> None:
    missing = [name for name in ("config.json",) if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise StartupError(f"model {model!r} at {path} lacks {', '.join(missing)}")
