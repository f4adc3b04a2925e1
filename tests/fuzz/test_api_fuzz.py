"""schemathesis against every service's OpenAPI document (issue 10): zero server errors, zero
answers that break their own schema, with a valid token carrying all of the service's scopes and
without one.

Each service's API runs in process over ASGI (schemathesis's `openapi.from_asgi`) as `hpcfleet
serve <service>` builds it, on a fresh PostgreSQL database (the production store: it refuses what
SQLite takes) and the in-memory bus with the fakes its own tests use, seeded with some data
(`fuzz_kit`). For each operation of its document, Hypothesis
draws schemathesis cases as four callers:

- `token`: a valid token with every scope of the service, valid (positive) and invalid
  (negative) inputs;
- `known`: the same token, with path parameters or bodies that exist in the seeded data (a
  pool's name, a build's id, an alert's id, real credentials) and the rest drawn, so that the
  answers past the 404 and the 422 are checked too;
- `none`: no Authorization header at all;
- `junk`: a token that is not valid: random text, JWT-shaped garbage, one signed by another key,
  one that expired;

and every answer is checked: not a server error, a status code the document declares, the
declared content type, a body that matches the declared schema; and a route that needs a token
answers `none` and `junk` with 401 before anything else.

At least 1,000 requests per service are sent and counted. In CI (`CI` set) Hypothesis is
derandomized (tests/conftest.py), so the run is the same every time.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fuzz_kit
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.cloud.moto_server import MotoServer
from shared.tokens import TokenIssuer, generate_signing_key

TARGET_REQUESTS = 1_000
SERVICES = ("pool", "bakery", "autogrow", "audit", "auth")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Of an operation's budget, the share of each caller and generation mode.
SHARES: tuple[tuple[str, GenerationMode, float], ...] = (
    ("known", GenerationMode.POSITIVE, 0.15),
    ("token", GenerationMode.POSITIVE, 0.25),
    ("token", GenerationMode.NEGATIVE, 0.30),
    ("none", GenerationMode.POSITIVE, 0.10),
    ("none", GenerationMode.NEGATIVE, 0.05),
    ("junk", GenerationMode.POSITIVE, 0.15),
)
NO_INPUT_EXAMPLES = 3  # an operation without parameters or body has next to nothing to vary
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_BASE64URL = st.characters(codec="ascii", categories=("Lu", "Ll", "Nd"), include_characters="-_")


@dataclass
class Report:
    """What one service's run sent and got back."""

    service: str
    requests: int = 0
    by_caller: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # (operation, status)
    distinct: set[tuple[Any, ...]] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.service}: {self.requests} requests ({len(self.distinct)} distinct) in "
            f"{self.seconds:.1f} s ({self.cpu_seconds:.1f} s CPU); by caller "
            f"{dict(self.by_caller)}; "
            f"statuses {dict(sorted(self.statuses.items()))}"
        )


def _junk_tokens(target: fuzz_kit.Target) -> st.SearchStrategy[str]:
    """Authorization headers whose token is not valid for this service."""
    stranger = TokenIssuer(generate_signing_key())
    forged = stranger.issue("mallory", "operator", target.scopes, target.clock.now())
    return st.one_of(
        st.text(_PRINTABLE, max_size=80).map(str.lstrip),  # no header value starts blank
        st.text(_PRINTABLE, max_size=80).map(lambda text: f"Bearer {text}"),
        st.lists(st.text(_BASE64URL, max_size=40), min_size=2, max_size=4).map(
            lambda parts: "Bearer " + ".".join(parts)
        ),
        st.sampled_from(
            [
                f"Bearer {forged}",
                f"Basic {forged}",
                f"Bearer {target.expired()}",
                f"Bearer {target.token()[:-4]}AAAA",  # its signature broken
                "Bearer",
                "Bearer  ",
            ]
        ),
    )


def _has_inputs(operation: APIOperation) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


def _budgets(schema: BaseSchema) -> dict[str, int]:
    """Examples per operation: the target (with a margin for what Hypothesis cannot vary) spread
    over the operations that take inputs."""
    operations = [result.ok() for result in schema.get_all_operations()]
    varied = [op for op in operations if _has_inputs(op)]
    each = math.ceil(TARGET_REQUESTS * 1.2 / max(1, len(varied)))
    return {op.label: each if _has_inputs(op) else NO_INPUT_EXAMPLES for op in operations}


def _caller(
    report: Report, caller: str, token: str, needs_token: bool, checks_itself: bool
) -> Callable[[schemathesis.Case, str], None]:
    """One call as `caller`, counted and checked."""

    def call(case: schemathesis.Case, header: str) -> None:
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if caller in ("token", "known"):
            headers["Authorization"] = f"Bearer {token}"
        elif caller == "junk":
            headers["Authorization"] = header
        case.headers = headers
        response = case.call()
        report.requests += 1
        report.by_caller[caller] += 1
        report.statuses[response.status_code] += 1
        report.answers[(case.operation.label, response.status_code)] += 1
        body = None if isinstance(case.body, NotSet) else repr(case.body)
        report.distinct.add((caller, case.method, case.formatted_path, repr(case.query), body))
        case.validate_response(response, checks=CHECKS)
        if caller in ("none", "junk") and needs_token:
            assert response.status_code == 401, (
                f"{case.method} {case.formatted_path} as caller {caller!r} answered "
                f"{response.status_code}, not 401: {response.text[:300]}"
            )
        if caller in ("none", "junk") and checks_itself:
            # auth's own routes check the token after FastAPI validated the path
            assert response.status_code in (401, 422), response.text[:300]

    return call


def fuzz(target: fuzz_kit.Target, schema: BaseSchema, *, scale: float = 1.0) -> Report:
    """Run every operation of `schema` as each caller; collect every failure."""
    report = Report(target.name)
    started, cpu = time.perf_counter(), time.process_time()
    token = target.token()
    junk = _junk_tokens(target)
    budgets = _budgets(schema)
    for result in schema.get_all_operations():
        operation = result.ok()
        needs_token = target.guarded(operation.path)
        checks_itself = operation.path.startswith(target.self_checked)
        known = target.known.get(operation.label, [])
        for caller, mode, share in SHARES:
            if not _has_inputs(operation) and mode is GenerationMode.NEGATIVE:
                continue
            if caller == "known" and not known:
                continue
            examples = max(1, round(budgets[operation.label] * share * scale))
            if not _has_inputs(operation):
                examples = NO_INPUT_EXAMPLES
            if caller == "known":
                cases = st.sampled_from(known).flatmap(
                    lambda fixed, op=operation: op.as_strategy(**fixed)
                )
            else:
                cases = operation.as_strategy(generation_mode=mode)
            check = _caller(report, caller, token, needs_token, checks_itself)
            run = settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate, Phase.shrink),
            )(given(case=cases, header=junk)(check))
            try:
                run()
            except Unsatisfiable:
                pass  # nothing to negate in this operation's inputs
            except (Exception, BaseExceptionGroup) as exc:
                report.failures.append(
                    f"--- {operation.label} as {caller!r} ({mode.value} inputs):\n{exc}"
                )
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = time.process_time() - cpu
    return report


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server
        server.reset()  # moto's backends are process-wide: leave no queues behind


@pytest.fixture
def loaded(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[str], tuple[fuzz_kit.Target, BaseSchema]]]:
    """Build a service's target and load its document over ASGI (which starts its lifespan);
    its lifespan is shut down and its helpers stopped afterwards."""
    with ExitStack() as stack:

        def load(service: str) -> tuple[fuzz_kit.Target, BaseSchema]:
            if service == "console":
                target = fuzz_kit.console_target()
            else:
                database = stack.enter_context(fuzz_kit.fresh_database())
                if service == "audit":
                    moto = request.getfixturevalue("moto")
                    target = fuzz_kit.audit_target(tmp_path, database, moto)
                else:
                    target = getattr(fuzz_kit, f"{service}_target")(tmp_path, database)
            stack.callback(target.close)
            stack.callback(shutdown_lifespans)  # before the database goes and the helpers stop
            return target, schemathesis.openapi.from_asgi("/openapi.json", target.app)

        yield load


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("service", SERVICES)
def test_no_server_error_and_no_answer_breaks_its_schema(
    service: str, loaded: Callable[[str], tuple[fuzz_kit.Target, BaseSchema]]
) -> None:
    target, schema = loaded(service)
    report = fuzz(target, schema)
    print(report.summary())
    assert not report.failures, f"{report.summary()}\n" + "\n".join(report.failures)
    assert report.requests >= TARGET_REQUESTS, report.summary()
    assert report.by_caller["none"] and report.by_caller["junk"], report.summary()
    assert report.by_caller["known"] or not target.known, report.summary()
    assert not [s for s in report.statuses if s >= 500], report.summary()


def test_the_console_token_route(
    loaded: Callable[[str], tuple[fuzz_kit.Target, BaseSchema]],
) -> None:
    """The status page's one route has no input to vary: a few calls of each caller, checked
    the same way (it answers this in-process caller, not on loopback, 403)."""
    target, schema = loaded("console")
    report = fuzz(target, schema)
    assert not report.failures, "\n".join(report.failures)
    token_route = {status for (label, status) in report.answers if label == "GET /console/token"}
    assert token_route == {403}, report.summary()


@pytest.mark.postgres
def test_the_documents_declare_what_the_apps_answer(
    loaded: Callable[[str], tuple[fuzz_kit.Target, BaseSchema]],
) -> None:
    """What the fuzz run relies on, stated once: guarded routes declare 401 and 403, every 422
    has the body the app's handler writes, and FastAPI's default 422 body is gone."""
    target, _ = loaded("pool")
    document = target.app.openapi()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    put = document["paths"]["/pool/pools/{name}"]["put"]["responses"]
    for code in ("400", "401", "403", "409", "422", "503"):
        assert "application/json" in put[code]["content"], code
    invalid = put["422"]["content"]["application/json"]["schema"]["$ref"]
    assert invalid.endswith("/InvalidRequest")
    health = document["paths"]["/healthz"]["get"]["responses"]
    assert "401" not in health
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]
