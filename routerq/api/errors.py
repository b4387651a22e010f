"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status the
official clients map to their exception classes (401 AuthenticationError, 404 NotFoundError, ...)."""

from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "server_error"}  # fmt: skip


SHOWN_ID = 80  # an id longer than any routerq makes is not echoed whole


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": _TYPES.get(self.status, "api_error"), "param": self.param,
                "code": self.code}  # fmt: skip
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def not_found(kind: str, ident: str) -> ApiError:
    """Also what another tenant's id answers: its existence is not revealed. A long id is cut."""
    shown = ident if len(ident) <= SHOWN_ID else f"{ident[:SHOWN_ID]}..."
    return ApiError(404, f"No such {kind}: {shown}", code=f"{kind}_not_found")
