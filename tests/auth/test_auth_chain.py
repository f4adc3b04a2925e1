"""The whole chain over real HTTP: dev AD FS (HTTPS) → signed SAML → moto STS → auth's credentials
endpoint → another service's aioboto3 EC2 client, and plain botocore on loopback.

auth runs under uvicorn with its lifespan on, as `hpcfleet serve auth` runs it, so the STS broker
is started by the router's lifespan and refreshes in the server's own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from auth_kit import ACCOUNT, ISSUER, PROVIDER, Tls, role_arn, serve
from botocore.credentials import ContainerProvider
from cryptography.hazmat.primitives import serialization

from services.auth.api import AuthContext
from services.auth.devidp import DevIdp, DevIdpConfig, DevUser, SigningKeyPair, role_value
from services.auth.login import save_token
from services.auth.service import assemble
from services.auth.settings import AuthSettings, RoleSettings
from shared.api import create_app
from shared.clock import SystemClock
from shared.cloud.aws import AwsCloud
from shared.cloud.moto_server import MotoServer
from shared.credentials import (
    AuthCredentialProvider,
    ClientCredentialsToken,
    CredentialsError,
    StaticToken,
    read_secret,
)
from shared.service import Runtime
from shared.settings import Settings
from shared.tokens import SecretRef, generate_signing_key

REGION = "us-east-1"
ROLES = ("pool", "bakery", "autogrow")
SERVICE_USERS = {
    name: DevUser(
        f"svc-{name}@example.test",
        f"{name}-Adfs-Passw0rd",
        roles=(role_value(role_arn(name), PROVIDER),),  # one role each: moto fails on two
    )
    for name in ROLES
}
CLIENT_SECRETS = {name: f"{name}-client-secret-0123456789" for name in ROLES}


@dataclass
class Chain:
    url: str
    context: AuthContext
    files: dict[str, Path]

    def provider(self, client: str, role: str) -> AuthCredentialProvider:
        token = ClientCredentialsToken(self.url, client, read_secret(f"file:{self.files[client]}"))
        return AuthCredentialProvider(self.url, role, token, attempts=1)

    def secrets(self) -> list[str]:
        """Everything that must never be logged."""
        found = [u.password for u in SERVICE_USERS.values()] + list(CLIENT_SECRETS.values())
        broker = self.context.broker
        assert broker is not None
        for name in ROLES:
            credentials = broker.credentials(name)
            found += [credentials.secret_access_key, credentials.session_token]
        return found


@pytest.fixture(scope="module")
def chain(
    signing: SigningKeyPair,
    tls: Tls,
    moto: MotoServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Chain]:
    folder = tmp_path_factory.mktemp("chain")
    idp = DevIdp(
        DevIdpConfig(environment="development", users=tuple(SERVICE_USERS.values())),
        signing,
        SystemClock(),  # moto stamps expirations with the real clock
    )
    files: dict[str, Path] = {}
    roles = {}
    for name, user in SERVICE_USERS.items():
        password = folder / f"{name}.adfs-password"
        password.write_text(user.password + "\n")
        roles[name] = RoleSettings(
            role_arn=role_arn(name),
            username=user.username,
            password=SecretRef.parse(f"file:{password}"),
        )
        files[name] = folder / f"{name}.client-secret"
        files[name].write_text(CLIENT_SECRETS[name])
    key = folder / "signing.pem"
    key.write_bytes(
        generate_signing_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert = folder / "adfs.crt"
    cert.write_bytes(signing.cert_pem)
    with serve(idp.app, tls) as adfs_url:
        settings = AuthSettings(
            environment="production",
            adfs_url=adfs_url,
            adfs_ca_bundle=tls.cert,
            adfs_signing_certificates=cert,
            adfs_issuer=ISSUER,
            saml_provider_arn=PROVIDER,
            roles=roles,
            sts_endpoint_url=moto.endpoint,
            signing_key=SecretRef.parse(f"file:{key}"),
            clients={name: SecretRef.parse(f"file:{files[name]}") for name in ROLES},
        )
        runtime = Runtime.from_settings(
            Settings(database_url=f"sqlite+aiosqlite:///{folder}/auth.db", aws_region=REGION)
        )
        service, context = assemble(runtime, settings)
        app = create_app(title="auth", routers=[service.router])
        with serve(app, lifespan=True) as url:
            deadline = time.monotonic() + 15
            while context.broker is None or not context.broker.ready():
                assert time.monotonic() < deadline, context.broker and context.broker.status()
                time.sleep(0.02)
            yield Chain(url, context, files)
    assert context.broker is None  # the lifespan stopped it


async def test_a_service_calls_ec2_with_credentials_from_auth(
    chain: Chain, moto: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    for chatty in ("botocore", "aiobotocore", "signxml", "httpcore", "httpx", "urllib3"):
        caplog.set_level(logging.WARNING, logger=chatty)
    caplog.set_level(logging.DEBUG)
    pool = chain.provider("pool", "pool")

    session = pool.session()
    async with session.client("sts", endpoint_url=moto.endpoint, region_name=REGION) as sts:
        identity = await sts.get_caller_identity()
    async with AwsCloud(REGION, endpoint_url=moto.endpoint, session=session) as cloud:
        instances = await cloud.describe_instances()
        async with session.client("ec2", endpoint_url=moto.endpoint, region_name=REGION) as ec2:
            launched = await ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)
        instance_id = launched["Instances"][0]["InstanceId"]
        after = await cloud.describe_instances(ids=[instance_id])

    assert identity["Arn"] == (
        f"arn:aws:sts::{ACCOUNT}:assumed-role/hpcfleet-pool/{SERVICE_USERS['pool'].username}"
    )
    assert instance_id not in [i.instance_id for i in instances]
    assert [i.instance_id for i in after] == [instance_id]
    vended = await pool.fetch()
    broker = chain.context.broker
    assert broker is not None
    assert vended.access_key == broker.credentials("pool").access_key_id
    assert vended.expiration == broker.credentials("pool").expiration.replace(microsecond=0)
    assert [s[:10] for s in chain.secrets() if s in caplog.text] == []


async def test_plain_botocore_reads_the_endpoint_on_loopback(
    chain: Chain, moto: MotoServer, tmp_path: Path
) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{chain.url}/auth/token",
            data={"grant_type": "client_credentials"},
            auth=("bakery", CLIENT_SECRETS["bakery"]),
        )
    token = answer.json()["access_token"]
    token_file = tmp_path / "token"
    save_token(token_file, token)  # no trailing newline: botocore sends the file verbatim
    endpoint = f"{chain.url}/auth/credentials/bakery"

    def load(environ: dict[str, str]) -> Any:
        loaded = ContainerProvider(environ=environ).load()
        assert loaded is not None and loaded.method == "container-role"
        return loaded.get_frozen_credentials()

    by_value, by_file = await asyncio.gather(
        asyncio.to_thread(
            load,
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": token,
            },
        ),
        asyncio.to_thread(
            load,
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
            },
        ),
    )

    assert by_value == by_file
    sts = boto3.client(
        "sts",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=by_value.access_key,
        aws_secret_access_key=by_value.secret_key,
        aws_session_token=by_value.token,
    )
    arn = (await asyncio.to_thread(sts.get_caller_identity))["Arn"]
    assert arn.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/hpcfleet-bakery/")


async def test_a_service_cannot_read_another_services_role(chain: Chain) -> None:
    with pytest.raises(CredentialsError, match=r"HTTP 403 .*aws:bakery"):
        await chain.provider("pool", "bakery").fetch()
    stranger = AuthCredentialProvider(chain.url, "pool", StaticToken("forged"), attempts=1)
    with pytest.raises(CredentialsError, match="HTTP 401"):
        await stranger.fetch()
