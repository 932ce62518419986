"""Errors a user can hit. Each message says what went wrong, where, and what to do."""


class FdppError(Exception):
    """Base class of every error fdpp raises on bad input or environment."""


class ModelLoadError(FdppError):
    """A model path, file, tensor or config could not be loaded."""


class UnsupportedModelError(ModelLoadError):
    """The architecture, quantization type or feature is not supported."""


class CacheTooSmallError(FdppError):
    """The KV cache budget cannot hold even one sequence."""


class InvalidRequestError(FdppError, ValueError):
    """A request (prompt, sampling parameters) is invalid. ``param`` names the offending parameter
    when one is to blame (the server reports it as OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
