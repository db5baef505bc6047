"""Secrets from the environment or from mounted files (`*_FILE`, the Docker/Kubernetes
convention), held as SecretStr so that no repr, log line or error message ever shows them."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr


def resolve_secret(name: str, value: SecretStr | None, file: Path | None) -> SecretStr | None:
    """The secret given directly or read from `file` (one trailing newline ignored); a clear error
    naming the setting and the file, never the content, when both are given or the file is unusable."""
    if file is None:
        if value is not None and not value.get_secret_value():
            raise ValueError(f"{name} is set but empty")
        return value
    if value is not None:
        raise ValueError(f"set {name} or {name}_file, not both")
    try:
        text = file.read_text()
    except OSError as exc:
        raise ValueError(f"{name}_file {str(file)!r} cannot be read: {exc.strerror}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ValueError(f"{name}_file {str(file)!r} is empty")
    return SecretStr(text)
