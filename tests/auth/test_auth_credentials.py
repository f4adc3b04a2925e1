"""When to refresh and what may be handed out (pure), and the container JSON SDKs accept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiobotocore.credentials import AioContainerProvider
from auth_kit import ACCOUNT, serve
from botocore.credentials import ContainerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.auth.broker import (
    AwsCredentials,
    RefreshPolicy,
    can_hand_out,
    next_refresh_delay,
    refresh_due,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
POLICY = RefreshPolicy()
TOKEN = "a-service-token"


def creds(minutes_left: float, now: datetime = NOW) -> AwsCredentials:
    return AwsCredentials(
        access_key_id="ASIAEXAMPLEEXAMPLE",
        secret_access_key="secret/key+example",
        session_token="session-token-example",
        expiration=now + timedelta(minutes=minutes_left),
        account_id=ACCOUNT,
    )


@pytest.mark.parametrize(
    ("minutes_left", "hand_out", "due"),
    [
        (60, True, False),
        (30.5, True, False),
        (30, True, True),  # the refresh point
        (20, True, True),  # the floor itself is still handed out
        (19.9, False, True),  # botocore would refresh on nearly every call
        (0, False, True),
        (-5, False, True),
    ],
)
def test_hand_out_and_refresh_decisions(minutes_left: float, hand_out: bool, due: bool) -> None:
    assert can_hand_out(creds(minutes_left), NOW, POLICY) is hand_out
    assert refresh_due(creds(minutes_left), NOW, POLICY) is due


def test_nothing_cached_means_refresh_now_and_nothing_to_hand_out() -> None:
    assert not can_hand_out(None, NOW, POLICY)
    assert refresh_due(None, NOW, POLICY)
    assert next_refresh_delay(None, None, 0, NOW, POLICY) == 0


@pytest.mark.parametrize(
    ("minutes_left", "fetched_ago", "expected"),
    [
        (60, 0, 30 * 60),  # fresh: wake at the refresh point
        (31, 29 * 60, 60),
        (29, 10 * 60, 0),  # overdue
        (25, 10, 50),  # STS gave short-lived credentials: no more than once a minute
    ],
)
def test_the_next_refresh_is_at_the_refresh_point_but_not_too_often(
    minutes_left: float, fetched_ago: float, expected: float
) -> None:
    fetched_at = NOW - timedelta(seconds=fetched_ago)
    delay = next_refresh_delay(creds(minutes_left), fetched_at, 0, NOW, POLICY)
    assert delay == expected


@pytest.mark.parametrize(("failures", "expected"), [(1, 5), (2, 10), (3, 20), (6, 120), (60, 120)])
def test_failures_back_off_exponentially_to_a_cap(failures: int, expected: float) -> None:
    assert next_refresh_delay(creds(25), NOW, failures, NOW, POLICY) == expected


def test_a_policy_that_refreshes_after_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="refresh_before must exceed min_remaining"):
        RefreshPolicy(refresh_before=timedelta(minutes=15))


def test_the_container_json_has_exactly_the_keys_botocore_reads() -> None:
    in_paris = timezone(timedelta(hours=1))
    vended = AwsCredentials(
        "ASIAEXAMPLE", "SECRET-VALUE", "TOKEN-VALUE", datetime(2030, 1, 1, 13, 30, tzinfo=in_paris)
    )

    assert vended.container_json() == {
        "AccessKeyId": "ASIAEXAMPLE",
        "SecretAccessKey": "SECRET-VALUE",
        "Token": "TOKEN-VALUE",
        "Expiration": "2030-01-01T12:30:00Z",
    }
    assert creds(60).container_json()["AccountId"] == ACCOUNT
    assert "SECRET-VALUE" not in repr(vended)
    assert "TOKEN-VALUE" not in repr(vended)


def _endpoint(credentials: AwsCredentials) -> Starlette:
    """The shape of `GET /auth/credentials/{role}`: the token verbatim in Authorization."""

    async def vend(request: Request) -> JSONResponse:
        if request.headers.get("Authorization") != TOKEN:
            return JSONResponse({"code": "unauthorized", "message": "token required"}, 401)
        return JSONResponse(credentials.container_json())

    return Starlette(routes=[Route("/auth/credentials/pool", vend)])


def test_botocore_container_provider_accepts_the_json() -> None:
    vended = creds(60, now=datetime.now(UTC))  # the SDKs read the real clock
    with serve(_endpoint(vended)) as url:
        provider = ContainerProvider(
            environ={
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{url}/auth/credentials/pool",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": TOKEN,
            }
        )
        loaded = provider.load()
        assert loaded is not None
        frozen = loaded.get_frozen_credentials()  # would refresh if under 15 min: it is not

    assert loaded.method == "container-role"
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (
        vended.access_key_id,
        vended.secret_access_key,
        vended.session_token,
    )


async def test_aiobotocore_container_provider_accepts_the_json() -> None:
    vended = creds(60, now=datetime.now(UTC))  # the SDKs read the real clock
    with serve(_endpoint(vended)) as url:
        provider = AioContainerProvider(
            environ={
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{url}/auth/credentials/pool",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": TOKEN,
            }
        )
        loaded = await provider.load()
        assert loaded is not None
        frozen = await loaded.get_frozen_credentials()

    assert frozen.access_key == vended.access_key_id
    assert frozen.token == vended.session_token
