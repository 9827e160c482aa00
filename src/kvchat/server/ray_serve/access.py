"""`IngressAccess`: what the ingress refuses before it reads a request's body.

The replicas run kvchat's whole app, whose Host check and API-key check would
refuse the same requests, but only after the ingress had read the body (up to
`max_body_bytes`), derived its routing text and sent it through Ray. The
ingress refuses them first, from the headers alone, with the same answers:

- a ``Host`` header that names neither a loopback host nor one of
  `allowed_hosts`: 403 ``host_not_allowed`` (see
  :class:`kvchat.server.middleware.HostCheck`, whose matching this uses);
- with `api_keys`, a ``/v1`` request (other than a CORS preflight, ``OPTIONS``,
  which browsers send without credentials) without ``Authorization: Bearer KEY``
  or ``x-api-key: KEY`` for one of them: 401 ``invalid_api_key``, as
  :meth:`kvchat.server.state.ServerState.authorize` answers;
- a declared ``Content-Length`` over `max_body_bytes`: 413 ``request_too_large``.

No Ray here: the checks are tested without a cluster.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from kvchat.server.errors import APIError, valid_text
from kvchat.server.middleware import HostCheck

__all__ = ["IngressAccess"]


class IngressAccess:
    """The header checks of the ingress (see the module doc)."""

    def __init__(self, *, api_keys: Iterable[str] = (), allowed_hosts: Iterable[str] = (), max_body_bytes: int) -> None:
        self._keys = tuple(key.encode() for key in api_keys)
        # Only its `allows` is used: it wraps no app here.
        self._hosts = HostCheck(None, allowed_hosts)  # type: ignore[arg-type]
        self._max_body_bytes = max_body_bytes

    def host_refusal(self, headers: Mapping[str, str]) -> APIError | None:
        """The 403 for a request whose ``Host`` is not allowed; None if it is."""
        host = headers.get("host")
        if self._hosts.allows(host):
            return None
        shown = valid_text(host or "")[:200]
        return APIError(
            403,
            f"the Host header {shown!r} names a host this server does not answer for; "
            "its operator can allow it (kvchat serve --allowed-host NAME)",
            code="host_not_allowed",
        )

    def refusal(self, method: str, path: str, headers: Mapping[str, str]) -> APIError | None:
        """Why a request to be forwarded is refused from its headers alone (None: it is not)."""
        refused = self.host_refusal(headers)
        if refused is not None:
            return refused
        needs_key = self._keys and method != "OPTIONS" and (path == "/v1" or path.startswith("/v1/"))
        if needs_key and not self._key_allowed(headers):
            return APIError(401, "invalid or missing API key", code="invalid_api_key")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> APIError:
        """The 413 for a body over `max_body_bytes`."""
        return APIError(413, f"the request body is larger than {self._max_body_bytes} bytes", code="request_too_large")

    def _key_allowed(self, headers: Mapping[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        presented = [token.strip().encode()] if scheme.lower() == "bearer" else []
        presented.append(headers.get("x-api-key", "").strip().encode())
        # Compare every credential with every key (no early exit), in constant time per key.
        matches = [hmac.compare_digest(credential, key) for credential in presented for key in self._keys]
        return any(matches)
