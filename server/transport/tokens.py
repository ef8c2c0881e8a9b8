"""Bearer tokens: from the environment and a token file, checked. No grpc here: the supervisor of --workers
reads the settings too (server.config)."""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import StartupError
from server.transport.files import read_file

# Comma-separated bearer tokens: kept off argv, where `ps` would show them.
AUTH_TOKENS_ENV = "NOMIC_EMBED_AUTH_TOKENS"


def split_tokens(text: str, source: str) -> list[str]:
    """Comma-separated tokens; ValueError when there is none, or one no client could send."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ValueError(f"{source} holds no token (comma-separated tokens expected); unset it for no "
                         "authentication")
    _check_tokens(tokens, source)
    return tokens


def _check_tokens(tokens: Sequence[str], source: str) -> None:
    for i, token in enumerate(tokens, 1):
        # Metadata values are printable ASCII; the message never shows the token itself.
        if not all(" " <= c <= "~" for c in token):
            raise ValueError(f"{source}: token {i} holds a character other than printable ASCII, which no "
                             "client can send in an authorization header")


def load_tokens(token_file: str | None, env_tokens: str | None) -> list[bytes]:
    """Tokens from a file (one per line, # comments) and/or a comma-separated environment value. Either,
    when set, must hold a token: a setting that yields none would turn authentication off unnoticed."""
    tokens: list[str] = []
    try:
        if token_file is not None:
            try:
                lines = read_file(token_file, "token file", "--auth-token-file").decode().splitlines()
            except UnicodeDecodeError:
                raise StartupError(f"the token file {token_file} is not UTF-8 text") from None
            found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not found:
                raise StartupError(f"the token file {token_file} holds no token")
            _check_tokens(found, f"the token file {token_file}")
            tokens += found
        if env_tokens is not None:
            tokens += split_tokens(env_tokens, AUTH_TOKENS_ENV)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    return [t.encode() for t in tokens]
