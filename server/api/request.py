"""The request class of the app: reading and decoding a body fails in one way, with a 4xx.

Litestar decodes a JSON body into Python objects (``Request.json``) before the signature model
converts it into the route's Struct.  That first decode raises more than Litestar catches: a
``RecursionError`` for a body nested deeper than the interpreter's limit, a ``UnicodeDecodeError`` for
bytes that are not UTF-8.  Every failure to read or decode the body is translated here, once, into
what FastAPI answers for it: ``missing`` for no body, ``json_invalid`` at a position for the rest.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.exceptions import InternalServerException, SerializationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from server.errors import BodyTooLarge, ClientGone, UnprocessableBody

_AT_BYTE = re.compile(r"\(byte (\d+)\)")


class APIRequest(Request[Any, Any, Any]):
    async def body(self) -> bytes:
        """The whole body, at most the app's ``request_max_body_size`` bytes (refused beyond it)."""
        try:
            return await super().body()
        except RequestEntityTooLarge:
            limit = self.route_handler.resolve_request_max_body_size()
            raise BodyTooLarge(
                f"Request body is larger than this service's limit of {limit} bytes (MAX_BODY_BYTES)."
            ) from None
        except InternalServerException:
            # Litestar's answer to a client that hung up while sending the body.
            raise ClientGone("client went away while sending the body") from None

    async def json(self) -> Any:
        """The body decoded as JSON; anything that is not decodable JSON is 422."""
        body = await self.body()
        if not body.strip():
            raise UnprocessableBody("Field required", loc=("body",), type="missing")
        try:
            return await super().json()
        except SerializationException as e:
            raise _invalid(str(e.detail or e), body) from None
        except RecursionError:
            raise _invalid("JSON is nested too deeply", body) from None
        except UnicodeDecodeError as e:
            raise _invalid("not valid UTF-8", body, e.start) from None
        except ValueError as e:  # numbers msgspec cannot represent, and any other value error of the decoder
            raise _invalid(str(e), body) from None


def _invalid(reason: str, body: bytes, position: int | None = None) -> UnprocessableBody:
    """FastAPI's ``json_invalid`` problem: ``loc`` is ``["body", <position of the error>]``."""
    if position is None:
        at = _AT_BYTE.search(reason)
        position = int(at[1]) if at else len(body) if "truncated" in reason else 0
    return UnprocessableBody(f"JSON decode error: {reason}", loc=("body", position), type="json_invalid")
