"""Service tokens (EdDSA JWTs, pure with the time passed in) and secret references."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from shared.tokens import (
    SecretError,
    SecretRef,
    TokenExpired,
    TokenInvalid,
    TokenIssuer,
    TokenScopeMissing,
    TokenVerifier,
    generate_signing_key,
    key_id,
    load_signing_key,
    public_key_pem,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
KEY = generate_signing_key()
ISSUER = TokenIssuer(KEY, ttl=timedelta(minutes=15))
VERIFIER = TokenVerifier([ISSUER.public_key_pem])


def test_a_token_carries_subject_role_and_scopes() -> None:
    token = ISSUER.issue("pool-worker", "pool", ["pool:read", "pool:write"], NOW)

    claims = VERIFIER.verify(token, NOW + timedelta(minutes=5), required_scopes=["pool:write"])

    assert (claims.subject, claims.role) == ("pool-worker", "pool")
    assert claims.scopes == {"pool:read", "pool:write"}
    assert claims.expires_at == NOW + timedelta(minutes=15)
    assert claims.issued_at == NOW


def test_a_missing_scope_is_named() -> None:
    token = ISSUER.issue("autogrow-worker", "autogrow", ["pool:read"], NOW)

    with pytest.raises(TokenScopeMissing, match="pool:write"):
        VERIFIER.verify(token, NOW, required_scopes=["pool:read", "pool:write"])


def test_expiry_is_checked_against_the_given_time_with_leeway() -> None:
    token = ISSUER.issue("alice", "operator", ["admin"], NOW)

    VERIFIER.verify(token, NOW + timedelta(minutes=15, seconds=29))
    with pytest.raises(TokenExpired, match="expired at"):
        VERIFIER.verify(token, NOW + timedelta(minutes=15, seconds=30))
    with pytest.raises(TokenInvalid, match="issued in the future"):
        VERIFIER.verify(token, NOW - timedelta(minutes=5))


def _claims(**changes: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": "hpcfleet-auth",
        "aud": "hpcfleet",
        "sub": "mallory",
        "role": "operator",
        "scope": "admin",
        "iat": int(NOW.timestamp()),
        "exp": int((NOW + timedelta(minutes=5)).timestamp()),
        "jti": "x",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


FORGED = generate_signing_key()


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("not-a-token", "not a JWT"),
        (
            jwt.encode(_claims(), FORGED, algorithm="EdDSA", headers={"kid": key_id(KEY)}),
            "signature is not valid",
        ),
        (
            jwt.encode(_claims(), FORGED, algorithm="EdDSA", headers={"kid": key_id(FORGED)}),
            "unknown key",
        ),
        (
            jwt.encode(_claims(), "x" * 32, algorithm="HS256", headers={"kid": key_id(KEY)}),
            "algorithm must be EdDSA",
        ),
        (jwt.encode(_claims(), "", algorithm="none"), "algorithm must be EdDSA"),
        (
            jwt.encode(_claims(aud="other"), KEY, algorithm="EdDSA", headers={"kid": key_id(KEY)}),
            "audience",
        ),
        (
            jwt.encode(_claims(iss="evil"), KEY, algorithm="EdDSA", headers={"kid": key_id(KEY)}),
            "issuer",
        ),
        (
            jwt.encode(_claims(scope=None), KEY, algorithm="EdDSA", headers={"kid": key_id(KEY)}),
            "scope",
        ),
    ],
    ids=[
        "garbage",
        "forged",
        "unknown-key",
        "hs256",
        "alg-none",
        "audience",
        "issuer",
        "no-scope",
    ],
)
def test_bad_tokens_are_refused_clearly(token: str, message: str) -> None:
    with pytest.raises(TokenInvalid, match=message):
        VERIFIER.verify(token, NOW)


def test_tokens_of_an_old_key_verify_during_a_rotation() -> None:
    new = TokenIssuer(generate_signing_key())
    both = TokenVerifier([ISSUER.public_key_pem, new.public_key_pem])

    both.verify(ISSUER.issue("a", "pool", [], NOW), NOW)
    both.verify(new.issue("b", "pool", [], NOW), NOW)


def test_token_lifetimes_are_short() -> None:
    with pytest.raises(ValueError, match="at most"):
        TokenIssuer(KEY, ttl=timedelta(hours=2))


def test_the_signing_key_comes_from_a_secret_reference(tmp_path: Path) -> None:
    path = tmp_path / "auth.key"
    path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    loaded = load_signing_key(SecretRef.parse(f"file:{path}"))

    assert public_key_pem(loaded) == ISSUER.public_key_pem
    path.write_text("not a key")
    with pytest.raises(SecretError, match="not a PEM private key"):
        load_signing_key(SecretRef.parse(f"file:{path}"))


@pytest.mark.parametrize("literal", ["hunter2", "secret:abc", "file:", "vault:kv/adfs"])
def test_a_literal_secret_is_refused(literal: str) -> None:
    with pytest.raises(SecretError, match="never as a literal"):
        SecretRef.parse(literal)


def test_secrets_are_read_when_needed_without_the_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "password"
    path.write_text("first\n")
    from_file = SecretRef.parse(f"file:{path}")
    assert from_file.read() == "first"
    path.write_text("rotated")
    assert from_file.read() == "rotated"

    monkeypatch.setenv("HPCFLEET_TEST_SECRET", "from-env")
    assert SecretRef.parse("env:HPCFLEET_TEST_SECRET").read() == "from-env"


def test_an_unreadable_secret_says_where_but_not_what(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=r"cannot read secret file .*missing"):
        SecretRef.parse(f"file:{tmp_path / 'missing'}").read()
    with pytest.raises(SecretError, match="empty or missing"):
        SecretRef.parse("env:HPCFLEET_TEST_NOT_SET").read()
