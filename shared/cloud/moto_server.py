"""`MotoServer`: moto over HTTP on 127.0.0.1, made more like AWS where hpcfleet depends on it.

Used by the cloud contract tests, embedded as "AWS" by the single-process mode, and run as its own
process for chaos tests (``python -m shared.cloud.moto_server --port N``). A WSGI middleware in
front of moto adds what moto lacks (see /work/shared/notes/moto-fidelity.md):

* ClientToken idempotency for RunInstances: the first successful response is replayed for the same
  token, and the same token with other parameters gets ``IdempotentParameterMismatch``.
* Fault injection: ``POST /_fault`` with JSON ``{action, code, status, count | rate, message}``
  makes matching calls fail (``action`` is the API action, e.g. ``RunInstances``, or ``*``);
  ``DELETE /_fault`` clears; ``GET /_fault`` lists, with the calls each fault failed so far
  (``hits``). `MotoServer.inject_fault` does the same.

* LaunchTime restarts when a stopped instance starts, as on EC2 (moto keeps the first launch's,
  which made every later run of a node look like it began at its first launch).
* Instance times on a rehearsal's clock: with ``clock_speed`` (``--clock-speed``, ``--clock-epoch``)
  EC2 stamps launches and state transitions on the same accelerated clock the services read
  (`shared.process.ClockSettings`), so the times EC2 reports agree with theirs.

``POST /moto-api/reset`` also clears the token cache and the faults, so a reset is a fresh AWS.
Moto's backends are global to the process: two MotoServers in one process share their state.

Benchmarks time what reaches AWS: `MotoServer(record=("StartInstances",))` notes the time each
such call arrived (`recorded`), taken before moto handles it, so no polling delay is measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from http.client import responses
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment
from xml.sax.saxutils import escape

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

FAULT_PATH = "/_fault"
RESET_PATH = "/moto-api/reset"
_REGION = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/")
_ACCESS_KEY = re.compile(r"Credential=([^/]+)/")
_MISMATCH = (
    "Arguments on this idempotent request are inconsistent with arguments used in previous "
    "request(s)."
)


@dataclass
class Fault:
    """Fail calls of `action` (or ``*``) with `code` and HTTP `status`.

    Each matching call fails with probability `rate`, at most `count` times (None: until cleared).
    Use status 500/503 to exercise botocore's retries (EC2 sends 500 for capacity errors and 503
    for RequestLimitExceeded); 400 is never retried.
    """

    action: str
    code: str
    status: int = 400
    count: int | None = 1
    rate: float = 1.0
    message: str = ""
    hits: int = 0  # calls failed so far, so a chaos run can report what it injected

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Parse a ``POST /_fault`` body; `count` defaults to 1, or to unlimited with a rate."""
        if not isinstance(data, dict) or not isinstance(data.get("action"), str):
            raise ValueError("a fault is a JSON object with at least 'action' and 'code'")
        if not isinstance(data.get("code"), str):
            raise ValueError("'code' must be a string")
        rate = float(data.get("rate", 1.0))
        count = data.get("count", None if "rate" in data else 1)
        if not 0.0 <= rate <= 1.0 or not (count is None or isinstance(count, int)):
            raise ValueError("'rate' is a probability and 'count' an integer or null")
        return cls(
            action=data["action"],
            code=data["code"],
            status=int(data.get("status", 400)),
            count=count,
            rate=rate,
            message=str(data.get("message", "")),
        )


@dataclass(frozen=True)
class RecordedCall:
    """One recorded AWS call: when it arrived (epoch seconds), its query parameters, and the
    access key it was signed with (empty if unsigned), to tell whose credentials made it."""

    at: float
    action: str
    params: dict[str, str]
    access_key: str = ""

    def values(self, prefix: str) -> list[str]:
        """The members of a query-protocol list, e.g. ``values("InstanceId")`` for
        ``InstanceId.1``, ``InstanceId.2``..."""
        return [v for k, v in self.params.items() if k.rpartition(".")[0] == prefix]


@dataclass(frozen=True)
class _Response:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


class AwsFidelityMiddleware:
    """WSGI middleware in front of moto: ClientToken idempotency and fault injection."""

    def __init__(self, app: WSGIApplication, seed: int = 0, record: Iterable[str] = ()) -> None:
        self._app = app
        self._random = random.Random(seed)
        self._record = frozenset(record)
        self._lock = threading.Lock()  # guards everything below
        self._recorded: list[RecordedCall] = []
        self._faults: list[Fault] = []
        self._launches: dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], _Response]] = {}
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        """Copies of the active faults, `count` being what is left of each."""
        with self._lock:
            return [replace(f) for f in self._faults]

    def recorded(self, action: str | None = None) -> list[RecordedCall]:
        """The calls recorded so far (of `action`, or all), oldest first."""
        with self._lock:
            return [c for c in self._recorded if action is None or c.action == action]

    def reset(self) -> None:
        """Forget faults, client tokens and recorded calls (moto's own reset empties its
        backends)."""
        with self._lock:
            self._recorded.clear()
            self._faults.clear()
            self._launches.clear()
            self._token_locks.clear()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        arrived = time.time()  # before anything else, for `record`
        path = environ.get("PATH_INFO", "")
        if path == FAULT_PATH:
            return self._control(environ, start_response)
        if path == RESET_PATH and environ.get("REQUEST_METHOD") == "POST":
            self.reset()
        body = _buffer_body(environ)
        target = environ.get("HTTP_X_AMZ_TARGET")
        params = _form(environ, body) if target is None else {}
        action = target.rpartition(".")[2] if target else params.get("Action", "")
        if action in self._record:
            signed = _ACCESS_KEY.search(environ.get("HTTP_AUTHORIZATION", ""))
            call = RecordedCall(arrived, action, params, signed.group(1) if signed else "")
            with self._lock:
                self._recorded.append(call)
        fault = self._take_fault(action) if action else None
        if fault is not None:
            return _error(
                start_response, fault.status, fault.code, fault.message, target is not None
            )
        token = params.get("ClientToken")
        if action == "RunInstances" and token:
            return self._run_instances(environ, start_response, body, token)
        return self._app(environ, start_response)

    def _take_fault(self, action: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.action in (action, "*") and self._random.random() < fault.rate:
                    fault.hits += 1
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _run_instances(
        self, environ: WSGIEnvironment, start_response: StartResponse, body: bytes, token: str
    ) -> Iterable[bytes]:
        """Replay the first successful launch for a token; one launch per token at a time."""
        match = _REGION.search(environ.get("HTTP_AUTHORIZATION", ""))
        key = (match.group(1) if match else "", token)
        fingerprint = tuple(
            sorted(p for p in parse_qsl(body.decode("utf-8", "replace")) if p[0] != "ClientToken")
        )
        with self._lock:
            token_lock = self._token_locks.setdefault(key, threading.Lock())
        with token_lock:
            with self._lock:
                known = self._launches.get(key)
            if known is None:
                response = self._call(environ)
                if response.status.startswith("2"):
                    with self._lock:
                        self._launches[key] = (fingerprint, response)
            elif known[0] != fingerprint:
                return _error(start_response, 400, "IdempotentParameterMismatch", _MISMATCH, False)
            else:
                response = known[1]
        start_response(response.status, response.headers)
        return [response.body]

    def _call(self, environ: WSGIEnvironment) -> _Response:
        captured: dict[str, Any] = {}
        chunks: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured.update(status=status, headers=headers)
            return chunks.append

        result = self._app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return _Response(captured["status"], list(captured["headers"]), b"".join(chunks))

    def _control(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        if method == "POST":
            try:
                self.add_fault(Fault.from_json(json.loads(_buffer_body(environ) or b"null")))
            except (TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
                return _json(start_response, "400 Bad Request", {"error": str(error)})
        elif method == "DELETE":
            self.clear_faults()
        elif method != "GET":
            return _json(start_response, "405 Method Not Allowed", {"error": "GET, POST or DELETE"})
        return _json(start_response, "200 OK", {"faults": [asdict(f) for f in self.faults()]})


def _buffer_body(environ: WSGIEnvironment) -> bytes:
    """Read the body and put it back, so moto still sees it."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return b""
    body: bytes = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def _form(environ: WSGIEnvironment, body: bytes) -> dict[str, str]:
    """Query-protocol parameters (EC2, STS, IAM...) from the query string and a form body."""
    params = dict(parse_qsl(environ.get("QUERY_STRING", "")))
    if "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
        params.update(parse_qsl(body.decode("utf-8", "replace")))
    return params


def _error(
    start_response: StartResponse, status: int, code: str, message: str, json_protocol: bool
) -> Iterable[bytes]:
    """An error body in the shape botocore parses for the protocol."""
    request_id = str(uuid.uuid4())
    if json_protocol:
        body = json.dumps({"__type": code, "message": message}).encode()
        content_type = "application/x-amz-json-1.1"
    else:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
        ).encode()
        content_type = "text/xml"
    start_response(
        f"{status} {responses.get(status, 'Error')}",
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("x-amzn-RequestId", request_id),
        ],
    )
    return [body]


def _json(start_response: StartResponse, status: str, payload: Any) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _restart_launch_time() -> None:
    """Make moto's instance start reset LaunchTime, as EC2 does; installed once per process."""
    from moto.ec2.models import instances

    original = instances.Instance.start
    if getattr(original, "_resets_launch_time", False):
        return

    def start(self: Any) -> Any:
        previous = original(self)
        if previous.name == "stopped":
            self.launch_time = instances.utcnow()
        return previous

    start._resets_launch_time = True  # type: ignore[attr-defined]
    instances.Instance.start = start  # type: ignore[method-assign]


def ec2_clock(speed: float, epoch: float) -> None:
    """Stamp EC2 instance times on an accelerated clock: `speed` times real time from the Unix time
    `epoch` (moto's backends are global, so this holds for every server in the process)."""
    from moto.ec2.models import instances

    def scaled_utcnow() -> datetime:
        scaled = epoch + (time.time() - epoch) * speed
        return datetime.fromtimestamp(scaled, UTC).replace(tzinfo=None)  # moto's are naive UTC

    instances.utcnow = scaled_utcnow


class _QuietHandler(MotoRequestHandler):
    """No line on stderr per request: a test run makes thousands."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class MotoServer:
    """A moto server in a background thread, behind `AwsFidelityMiddleware`.

    `load_default_amis` is off by default: moto's ~1,200 public AMIs cost ~1.7 s on the first EC2
    call and after every reset, and hpcfleet never needs them (moto accepts made-up AMI ids for
    launches; seed a base image with register_image when the bakery needs one). moto reads the
    setting from the environment whenever it builds a backend, so `start()` sets
    ``MOTO_EC2_LOAD_DEFAULT_AMIS`` for the whole process.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        load_default_amis: bool = False,
        seed: int = 0,
        verbose: bool = False,
        record: Iterable[str] = (),
        clock_speed: float = 1.0,
        clock_epoch: float | None = None,
    ) -> None:
        """`record` names the actions (e.g. ``StartInstances``) whose arrival times to keep;
        `clock_speed` and `clock_epoch` put EC2's instance times on a rehearsal's clock."""
        self.clock_speed = clock_speed
        self.clock_epoch = clock_epoch
        self.host = host
        self.port = port
        self.load_default_amis = load_default_amis
        self.verbose = verbose
        self.middleware = AwsFidelityMiddleware(
            DomainDispatcherApplication(create_backend_app), seed=seed, record=record
        )
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind (port 0 picks a free one) and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = str(self.load_default_amis).lower()
        _restart_launch_time()
        if self.clock_speed != 1.0:
            ec2_clock(self.clock_speed, self.clock_epoch or time.time())
        server = make_server(
            self.host,
            self.port,
            self.middleware,
            threaded=True,
            request_handler=MotoRequestHandler if self.verbose else _QuietHandler,
        )
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._server = server
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; idempotent."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: pass it to AwsCloud as `endpoint_url`."""
        if self._server is None:
            raise RuntimeError("MotoServer is not started")
        return f"http://{self.host}:{self._server.server_port}"

    def inject_fault(
        self,
        action: str,
        code: str,
        *,
        status: int = 400,
        count: int | None = 1,
        rate: float = 1.0,
        message: str = "",
    ) -> None:
        """Same as ``POST /_fault``, without HTTP. See `Fault`."""
        self.middleware.add_fault(Fault(action, code, status, count, rate, message))

    def clear_faults(self) -> None:
        self.middleware.clear_faults()

    def recorded(self, action: str | None = None) -> list[RecordedCall]:
        """Calls of the actions given as `record`, with their arrival times; see `RecordedCall`."""
        return self.middleware.recorded(action)

    def reset(self) -> None:
        """Empty every moto backend and forget faults and client tokens (``POST
        /moto-api/reset``). Blocking: call it from a sync fixture or a thread."""
        request = urllib.request.Request(self.endpoint + RESET_PATH, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; print the endpoint first, so a parent process can read it."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.cloud.moto_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0, help="seed for random faults")
    parser.add_argument("--default-amis", action="store_true", help="load moto's public AMIs")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument("--clock-speed", type=float, default=1.0, help="EC2 times run this fast")
    parser.add_argument("--clock-epoch", type=float, default=None, help="...from this Unix time")
    args = parser.parse_args(argv)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    with MotoServer(
        args.host,
        args.port,
        load_default_amis=args.default_amis,
        seed=args.seed,
        verbose=args.verbose,
        clock_speed=args.clock_speed,
        clock_epoch=args.clock_epoch,
    ) as server:
        print(server.endpoint, flush=True)
        stopped.wait()


if __name__ == "__main__":
    main()
