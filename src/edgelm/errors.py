"""Errors that carry what a user needs: an HTTP status, an OpenAI error type and code.

The service turns any :class:`EdgelmError` into ``{"error": {...}}`` with its status; the CLI
prints its message on one line and exits non-zero. Nothing else needs to know about HTTP.
"""

from __future__ import annotations


class EdgelmError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(EdgelmError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(EdgelmError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unsupported(InvalidRequest):
    """The engine behind the model does not declare the capability asked for."""

    code = "unsupported"


class ModelLoadError(EdgelmError):
    status = 503
    type = "server_error"
    code = "model_load_failed"


class MissingExtra(EdgelmError):
    """An optional dependency is not installed; the message says which extra installs it."""

    status = 501
    type = "server_error"
    code = "missing_dependency"

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"{package} is not installed; install it with: pip install 'edgelm[{extra}]'"
        )


class DownloadError(EdgelmError):
    """No source delivered the file: a failure upstream of the service (502), not in it."""

    status = 502
    type = "upstream_error"
    code = "download_failed"


class ChecksumMismatch(DownloadError):
    code = "checksum_mismatch"


class ConfigError(EdgelmError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_config"


class UpstreamError(EdgelmError):
    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class DiskFull(EdgelmError):
    """The disk (or the SQLite file's size limit) ran out mid-write: the write was undone
    whole, and the message says what was kept and how to finish."""

    status = 507
    type = "server_error"
    code = "disk_full"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS or SQLite saying there is no space left (ENOSPC, EDQUOT,
    SQLITE_FULL), from the standard ``sqlite3`` module or sqlean's identical one."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if type(exc).__name__ == "OperationalError":
        return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)
    return False


class EngineFailed(EdgelmError):
    """An engine raised while generating (a backend bug, a broken model file found mid-run):
    the request ends with the model named and the cause, the service and the model stay up."""

    status = 500
    type = "server_error"
    code = "engine_failed"


class Overloaded(EdgelmError):
    status = 503
    type = "server_error"
    code = "overloaded"


class Busy(EdgelmError):
    """The model is serving requests and cannot be unloaded right now."""

    status = 409
    type = "invalid_request_error"
    code = "model_busy"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class GenerationTimeout(EdgelmError):
    status = 504
    type = "server_error"
    code = "generation_timeout"


class EngineCrashed(EdgelmError):
    """The process running a model's engine died (a segfault, an abort, the out-of-memory
    killer): this request ends, the service stays up, and the next request starts the model's
    runner again. The message names the model and how its runner ended."""

    status = 500
    type = "server_error"
    code = "engine_crashed"
