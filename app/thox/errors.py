"""Errors shared by every layer. The API maps them to the OpenAI error shape
(see thox.api.errors); the CLI prints their message on one line."""

from __future__ import annotations


class ThoxError(Exception):
    """A user-facing error with an HTTP status and an OpenAI error type/code."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class InvalidRequest(ThoxError):
    status = 400
    type = "invalid_request_error"


class ConfigError(InvalidRequest):
    code = "invalid_config"


class NotFound(ThoxError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ModelBroken(ThoxError):
    """The model file exists but cannot be loaded (corrupt, truncated)."""

    status = 400
    type = "invalid_request_error"
    code = "model_broken"


class Overloaded(ThoxError):
    """Queue full or model does not fit: 503/429 with Retry-After."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, status: int = 503,
                 code: str | None = None):
        super().__init__(message, status=status, code=code,
                         headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class StoreError(ThoxError):
    """Model store failures (integrity, disk space, locks, downloads)."""

    status = 400
    code = "store_error"


class UpdateError(ThoxError):
    """Firmware updates: RAUC missing or failing, a bundle download or upload refused."""

    status = 400
    code = "update_error"


class BackupError(ThoxError):
    """Backups: a file that cannot be decrypted or verified, a member refused, age or zstd failing."""

    status = 400
    code = "backup_error"
