"""The request class of the app: reading and decoding a body fails in one way, with a 4xx.

Litestar decodes a JSON body into Python objects (``Request.json``) before the signature model
converts it into the route's Struct.  That first decode raises more than Litestar catches: a
``RecursionError`` for a body nested deeper than the interpreter's limit, a ``UnicodeDecodeError`` for
bytes that are not UTF-8.  Every failure to read or decode the body is translated here, once.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import InternalServerException, SerializationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from server.errors import BodyTooLarge, ClientGone, UnprocessableBody


class APIRequest(Request[Any, Any, Any]):
    async def body(self) -> bytes:
        """The whole body, at most the app's ``request_max_body_size`` bytes (413 beyond it)."""
        try:
            return await super().body()
        except RequestEntityTooLarge:
            limit = self.route_handler.resolve_request_max_body_size()
            raise BodyTooLarge(
                f"Request body is larger than this service's limit of {limit} bytes."
            ) from None
        except InternalServerException:
            # Litestar's answer to a client that hung up while sending the body.
            raise ClientGone("client went away while sending the body") from None

    async def json(self) -> Any:
        """The body decoded as JSON; anything that is not decodable JSON is 422."""
        try:
            return await super().json()
        except SerializationException as e:
            raise UnprocessableBody(f"Invalid request body: {e}") from None
        except RecursionError:
            raise UnprocessableBody("Invalid request body: JSON is nested too deeply.") from None
        except UnicodeDecodeError:
            raise UnprocessableBody("Invalid request body: not valid UTF-8.") from None
        except ValueError as e:  # numbers msgspec cannot represent, and any other value error of the decoder
            raise UnprocessableBody(f"Invalid request body: {e}") from None
