"""Fixtures for auth: the development IdP, its trust, TLS material, a moto server, a clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from auth_kit import ISSUER, USERS, Tls

from services.auth.devidp import DevIdp, DevIdpConfig, DevUser, SigningKeyPair
from services.auth.saml import SamlTrust, load_certificates
from shared.clock import ManualClock
from shared.cloud.moto_server import MotoServer


@pytest.fixture(scope="session")
def signing() -> SigningKeyPair:
    return SigningKeyPair.generate("ADFS Signing - adfs.example.test", datetime.now(UTC))


@pytest.fixture(scope="session")
def other_signing() -> SigningKeyPair:
    return SigningKeyPair.generate("ADFS Signing - someone else", datetime.now(UTC))


@pytest.fixture
def clock() -> ManualClock:
    """Anchored at the real time: moto stamps STS expirations with the real clock."""
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def make_idp(signing: SigningKeyPair, clock: ManualClock) -> Callable[..., DevIdp]:
    def make(users: tuple[DevUser, ...] = USERS, **settings: Any) -> DevIdp:
        config = DevIdpConfig(environment="development", users=users, **settings)
        return DevIdp(config, signing, clock)

    return make


@pytest.fixture
def idp(make_idp: Callable[..., DevIdp]) -> DevIdp:
    return make_idp()


@pytest.fixture
def trust(signing: SigningKeyPair) -> SamlTrust:
    return SamlTrust(load_certificates(signing.cert_pem), issuer=ISSUER)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed server certificate for 127.0.0.1: AD FS's Secure cookies need https."""
    return Tls.generate(tmp_path_factory.mktemp("tls"), datetime.now(UTC))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server
