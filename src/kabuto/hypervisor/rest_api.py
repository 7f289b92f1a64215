"""A VMM's REST API over its Unix socket (Cloud Hypervisor, Firecracker): httpx with a bounded
answer; every non-2xx answer becomes a HypervisorError carrying the VMM's own words."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kabuto.errors import HypervisorError, VmTimeout

#: bound on every API call; a VMM that does not answer in this time is treated as hung
API_TIMEOUT = 10.0
#: bound on an API answer's body (vm.info is a few KiB)
MAX_API_ANSWER_BYTES = 1 << 20


class ApiTransportError(HypervisorError):
    """The API socket failed (refused, reset): the VMM may have just died."""


class ApiClient:
    """HTTP/1.1 over a Unix socket; ``describe_error`` puts an error body in words."""

    def __init__(
        self,
        backend: str,
        socket_path: Path,
        describe_error: Callable[[httpx.Response], str],
        timeout: float = API_TIMEOUT,
    ) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self._describe_error = describe_error
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=timeout,
        )

    async def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            async with self._client.stream(method, path, json=body) as streamed:
                content = bytearray()
                async for chunk in streamed.aiter_bytes():
                    content += chunk
                    if len(content) > MAX_API_ANSWER_BYTES:
                        raise HypervisorError(
                            f"{self.backend}: {method} {path}: answer exceeds {MAX_API_ANSWER_BYTES} bytes"
                        )
            response = httpx.Response(
                streamed.status_code,
                headers=streamed.headers,
                content=bytes(content),
                request=streamed.request,
            )
        except httpx.TimeoutException as exc:
            raise VmTimeout(f"{self.backend}: {method} {path} got no answer within the API timeout") from exc
        except httpx.TransportError as exc:
            raise ApiTransportError(
                f"{self.backend}: {method} {path} failed: {exc or type(exc).__name__}"
            ) from exc
        except httpx.HTTPError as exc:
            raise HypervisorError(
                f"{self.backend}: {method} {path} failed: {exc or type(exc).__name__}"
            ) from exc
        if not response.is_success:
            detail = self._describe_error(response)
            raise HypervisorError(f"{self.backend}: {method} {path} -> {response.status_code}: {detail}")
        return response

    async def aclose(self) -> None:
        await self._client.aclose()
