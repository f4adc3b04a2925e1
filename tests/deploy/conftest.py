"""A moto server per test module, left clean for whoever uses moto next in this process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint
    finally:
        # moto's backends are process-wide: drop our stacks, roles and queues so that a later
        # test's server (or mock_aws) does not find them
        httpx.post(f"{endpoint}/moto-api/reset")
        server.stop()
