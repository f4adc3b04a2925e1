"""Fixtures for auth: the development IdP, its trust, TLS material, a moto server, a clock."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from auth_kit import ISSUER, USERS, Tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Tls(cert_path, key_path)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server
