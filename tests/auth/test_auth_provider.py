"""shared/credentials.py against a scripted auth (httpx MockTransport): retries, token renewal,
clear errors, and botocore refreshing with the real expiry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from shared.credentials import (
    AuthCredentialProvider,
    ClientCredentialsToken,
    CredentialsError,
    StaticToken,
    TokenFile,
    read_secret,
)

AUTH = "http://auth.internal:8000"
URL = f"{AUTH}/auth/credentials/pool"


def body(minutes: float = 60, key: str = "ASIAPOOL", zone: str = "Z") -> dict[str, str]:
    expiry = datetime.now(UTC) + timedelta(minutes=minutes)
    return {
        "AccessKeyId": key,
        "SecretAccessKey": f"secret-{key}",
        "Token": f"token-{key}",
        "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%S") + zone,
    }


class Script:
    """Answers requests in order and records them."""

    def __init__(self, *answers: httpx.Response | Callable[[httpx.Request], httpx.Response]):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        return answer(request) if callable(answer) else answer

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def ok(data: object) -> httpx.Response:
    return httpx.Response(200, json=data)


def error(status: int, detail: str) -> httpx.Response:
    return httpx.Response(status, json={"detail": detail})


def provider(script: Script, token: object = None, **options: object) -> AuthCredentialProvider:
    return AuthCredentialProvider(
        AUTH,
        "pool",
        token or StaticToken("tok"),  # type: ignore[arg-type]
        transport=script.transport(),
        backoff=0,
        **options,  # type: ignore[arg-type]
    )


async def test_credentials_are_fetched_with_the_token_as_bearer() -> None:
    script = Script(ok(body()))

    vended = await provider(script).fetch()

    assert vended.access_key == "ASIAPOOL"
    assert vended.expiration.tzinfo is not None
    assert script.requests[0].url == URL
    assert script.requests[0].headers["Authorization"] == "Bearer tok"
    assert "secret-ASIAPOOL" not in repr(vended)


async def test_a_busy_or_unreachable_auth_is_retried() -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    script = Script(error(503, "no fresh credentials"), unreachable, ok(body()))

    assert (await provider(script).fetch()).access_key == "ASIAPOOL"
    assert len(script.requests) == 3


async def test_a_refused_token_is_renewed_once() -> None:
    class Counting(StaticToken):
        invalidated = 0

        def invalidate(self) -> None:
            self.invalidated += 1

    token = Counting("tok")
    script = Script(error(401, "the token expired"), ok(body()))
    assert (await provider(script, token).fetch()).access_key == "ASIAPOOL"
    assert token.invalidated == 1

    script = Script(error(401, "expired"), error(401, "still expired"))
    with pytest.raises(CredentialsError, match="HTTP 401 still expired"):
        await provider(script, token).fetch()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (error(403, "the token lacks scope(s): aws:pool"), "HTTP 403 the token lacks"),
        (error(404, "no role named 'pool'"), "HTTP 404 no role named"),
        (httpx.Response(200, text="<html>"), "not JSON"),
        (ok(["a list"]), "not an object"),
        (ok({"AccessKeyId": "A"}), "lack SecretAccessKey, Token, Expiration"),
        (ok(body(zone="")), "no time zone"),
        (ok(body() | {"Expiration": "soon"}), "not an ISO 8601 time"),
    ],
)
async def test_unusable_answers_are_a_clear_error_without_retrying(
    answer: httpx.Response, message: str
) -> None:
    script = Script(answer)
    with pytest.raises(CredentialsError, match=message):
        await provider(script, attempts=3).fetch()
    assert len(script.requests) == 1


async def test_the_session_refreshes_when_botocore_says_so() -> None:
    """botocore refreshes 15 min before Expiration: auth's real expiry drives it."""
    script = Script(ok(body(minutes=14, key="ASIAFIRST")), ok(body(minutes=60, key="ASIANEXT")))
    session = provider(script).session()
    credentials = await session.get_credentials()
    assert credentials is not None

    first = await credentials.get_frozen_credentials()  # fetch 1: only 14 min left
    second = await credentials.get_frozen_credentials()  # inside the 15 min window: fetch 2
    third = await credentials.get_frozen_credentials()  # 60 min left: no fetch

    assert [c.access_key for c in (first, second, third)] == ["ASIAFIRST", "ASIANEXT", "ASIANEXT"]
    assert len(script.requests) == 2
    assert credentials.method == "hpcfleet-auth"


async def test_the_provider_is_the_callable_awscloud_takes() -> None:
    script = Script(ok(body()))
    assert await provider(script)() == ("ASIAPOOL", "secret-ASIAPOOL", "token-ASIAPOOL")


async def test_client_credentials_tokens_are_cached_until_near_expiry(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    issued = iter(["t1", "t2"])

    def token_answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"].startswith("Basic ")
        assert b"grant_type=client_credentials" in request.content
        return ok({"access_token": next(issued), "expires_in": 900})

    script = Script(token_answer, token_answer)
    source = ClientCredentialsToken(
        AUTH, "pool", read_secret(f"file:{secret}"), transport=script.transport()
    )

    assert [await source.token(), await source.token()] == ["t1", "t1"]
    source.invalidate()
    assert await source.token() == "t2"

    refused = ClientCredentialsToken(
        AUTH,
        "pool",
        read_secret(f"file:{secret}"),
        transport=Script(error(401, "unknown client or wrong secret")).transport(),
    )
    with pytest.raises(CredentialsError, match="refused client 'pool': HTTP 401 unknown client"):
        await refused.token()


async def test_secrets_and_token_files_are_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOL_SECRET", "from-env")
    assert read_secret("env:POOL_SECRET")() == "from-env"
    with pytest.raises(CredentialsError, match="'file:<path>' or 'env:"):
        read_secret("a-literal-secret")
    with pytest.raises(CredentialsError, match="cannot read secret file"):
        read_secret(f"file:{tmp_path / 'missing'}")()
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    assert await TokenFile(token_file).token() == "tok"
    token_file.write_text("")
    with pytest.raises(CredentialsError, match="empty"):
        await TokenFile(token_file).token()
