"""Domain errors. Each carries its HTTP status; one handler renders them as
``{"error": <class name>, "detail": <message>}``.

Hierarchy::

    GradsentryError
    ├── BadRequest (400)            CorruptBody
    ├── Unauthorized (401)          no, malformed, unknown or revoked token
    ├── Forbidden (403)             a valid token without the scope or the project
    ├── NotFound (404)              RunNotFound, SeriesNotFound
    ├── Conflict (409)              RunConflict
    ├── PayloadTooLarge (413)       BodyTooLarge, BatchTooLarge
    ├── UnsupportedMediaType (415)  WrongContentType
    ├── InvalidInput (422)          InvalidBatch, LayerCountMismatch, DuplicateStep
    └── TooManyRequests (429)       RateLimited (with Retry-After)
"""

from __future__ import annotations


class GradsentryError(Exception):
    """Base of every error the API reports on purpose."""

    status_code = 500
    headers: dict[str, str] = {}  # sent with the answer

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(GradsentryError):
    status_code = 400


class CorruptBody(BadRequest):
    """The body could not be decompressed or decoded."""


class Unauthorized(GradsentryError):
    """No usable credentials; the answer asks for a bearer token."""

    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="gradsentry"'}


class Forbidden(GradsentryError):
    status_code = 403


class NotFound(GradsentryError):
    status_code = 404


class RunNotFound(NotFound):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist; create it with POST /api/v1/runs")


class SeriesNotFound(NotFound):
    pass


class Conflict(GradsentryError):
    status_code = 409


class RunConflict(Conflict):
    pass


class PayloadTooLarge(GradsentryError):
    status_code = 413


class BodyTooLarge(PayloadTooLarge):
    pass


class BatchTooLarge(PayloadTooLarge):
    pass


class UnsupportedMediaType(GradsentryError):
    status_code = 415


class WrongContentType(UnsupportedMediaType):
    pass


class InvalidInput(GradsentryError):
    status_code = 422


class InvalidBatch(InvalidInput):
    pass


class LayerCountMismatch(InvalidInput):
    pass


class DuplicateStep(InvalidInput):
    pass


class TooManyRequests(GradsentryError):
    status_code = 429


class RateLimited(TooManyRequests):
    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}
