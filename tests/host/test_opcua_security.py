"""OPC-UA security: one Basic256Sha256 Sign&Encrypt endpoint, a trust list, user accounts, roles.

Refusals are checked at the server: where asyncua's client would refuse first (it finds no
endpoint for what it was asked), `_bypass_client_checks` makes it send the request anyway."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from edgeline.host import opcua_security as sec
from edgeline.host.opcua_watch import ClientCredentials, connect

from opcua_pki import PASSWORDS, birth, client_identity, gateway, make_pki, send, window

pytestmark = pytest.mark.timeout(60)

B256 = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"


@pytest.fixture
def bypass_client_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let asyncua's client use whatever channel and token it was told to, even when the
    server does not offer it: the refusal must then come from the server."""
    real = Client.find_endpoint

    def find_endpoint(endpoints: list[ua.EndpointDescription], mode: Any, policy_uri: str) -> Any:
        try:
            return real(endpoints, mode, policy_uri)
        except ua.UaError:
            ep = endpoints[0]
            ep.SecurityMode, ep.SecurityPolicyUri = mode, policy_uri
            return ep

    def server_policy(self: Client, token_type: ua.UserTokenType) -> ua.UserTokenPolicy:
        return ua.UserTokenPolicy(PolicyId=f"edgeline-test-{token_type.name}", TokenType=token_type)

    monkeypatch.setattr(Client, "find_endpoint", staticmethod(find_endpoint))
    monkeypatch.setattr(Client, "server_policy", server_policy)
    yield


async def _secure_client(endpoint: str, creds: ClientCredentials, *, user: bool = True) -> Client:
    client = Client(endpoint, timeout=10)
    client.application_uri = creds.app_uri
    if user:
        client.set_user(creds.username)
        client.set_password(creds.password)
    await client.set_security(SecurityPolicyBasic256Sha256, str(creds.cert), str(creds.key))
    await client.connect()
    return client


def test_endpoints_sessions_and_roles(
    tmp_path: Path, bypass_client_checks: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgeline.opcua.security")
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        async with gateway(pki.cfg) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            await send(gw, "n1", "evt", window("n1", 1, 0.5))
            await gw.opcua.flush()
            ep = gw.opcua.endpoint

            # What the server offers: one endpoint, Sign&Encrypt, user name tokens only.
            probe = Client(ep)
            endpoints = await probe.connect_and_get_server_endpoints()
            assert [(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints] == [
                (B256, ua.MessageSecurityMode.SignAndEncrypt)
            ]
            assert {t.TokenType for e in endpoints for t in e.UserIdentityTokens} == {
                ua.UserTokenType.UserName
            }
            server_cert = x509.load_der_x509_certificate(endpoints[0].ServerCertificate)
            uris = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert gw.opcua.application_uri in uris.get_values_for_type(x509.UniformResourceIdentifier)

            # Anonymous: refused over None and over Sign&Encrypt with a trusted certificate.
            with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
                await Client(ep, timeout=10).connect()
            with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
                await _secure_client(ep, pki.operator, user=False)
            # A right password over a None channel (no client certificate): refused.
            plain = Client(ep, timeout=10)
            plain.set_user("olga")
            plain.set_password(PASSWORDS["olga"])
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await plain.connect()
            assert any("no trusted client certificate" in r.getMessage() for r in caplog.records)
            # A wrong password, an unknown user: refused.
            for user, pw in (("olga", "not-her-password"), ("mallory", PASSWORDS["olga"])):
                bad = ClientCredentials(pki.operator.cert, pki.operator.key, pki.operator.app_uri, user, pw)
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await connect(ep, bad)

            # A viewer reads and browses; nobody writes over the network.
            viewer = await connect(ep, pki.viewer)
            try:
                idx = await viewer.get_namespace_index("urn:edgeline:gateway")
                score = viewer.get_node(ua.NodeId("s1/l1/m1/vibration/Score", idx))
                assert await score.read_value() == 0.5
                names = {(await n.read_browse_name()).Name for n in await viewer.nodes.objects.get_children()}
                assert "s1" in names
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await score.write_value(ua.DataValue(ua.Variant(9.0, ua.VariantType.Double)))
            finally:
                await viewer.disconnect()
            operator = await connect(ep, pki.operator)
            try:
                idx = await operator.get_namespace_index("urn:edgeline:gateway")
                score = operator.get_node(ua.NodeId("s1/l1/m1/vibration/Score", idx))
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await score.write_value(ua.DataValue(ua.Variant(9.0, ua.VariantType.Double)))
                assert await score.read_value() == 0.5
            finally:
                await operator.disconnect()

    asyncio.run(scenario())


def test_trust_list(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        async with gateway(pki.cfg) as gw:
            ep = gw.opcua.endpoint
            with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
                await connect(ep, pki.untrusted)
            # Kept for the administrator in rejected/; trusting it needs no restart.
            rejected = list(pki.cfg.rejected_dir.glob("*.der"))
            assert len(rejected) == 1
            assert (
                "CN=stranger"
                in x509.load_der_x509_certificate(rejected[0].read_bytes()).subject.rfc4514_string()
            )
            shutil.move(rejected[0], pki.cfg.trusted_dir / rejected[0].name)
            c = await connect(ep, pki.untrusted)
            await c.disconnect()

            # Removed from the trust list: refused again.
            (pki.cfg.trusted_dir / rejected[0].name).unlink()
            os.utime(pki.cfg.trusted_dir)
            with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
                await connect(ep, pki.untrusted)

            # A trusted certificate whose URI is not the client's application URI: refused.
            liar = ClientCredentials(
                pki.operator.cert, pki.operator.key, "urn:someone:else", "olga", PASSWORDS["olga"]
            )
            with pytest.raises(ua.UaError):
                await connect(ep, liar)

    asyncio.run(scenario())


def test_certificate_files_and_users_file(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    text = pki.cfg.users_path.read_text()
    assert PASSWORDS["olga"] not in text and PASSWORDS["victor"] not in text
    assert stat.S_IMODE(pki.cfg.users_path.stat().st_mode) == 0o600
    accounts = sec.load_users(pki.cfg.users_path)
    assert {(a.name, a.role) for a in accounts.values()} == {("olga", "operator"), ("victor", "viewer")}
    assert sec.verify_password(PASSWORDS["olga"], accounts["olga"].password_hash)
    assert not sec.verify_password("nope", accounts["olga"].password_hash)
    h1, h2 = sec.hash_password("same"), sec.hash_password("same")
    assert h1 != h2, "salted"

    bad = tmp_path / "bad.toml"
    bad.write_text('[users.eve]\nrole = "root"\npassword_hash = "scrypt$x"\n')
    with pytest.raises(sec.SecurityConfigError, match=r"bad.toml: \[users.eve\]: role must be one of"):
        sec.load_users(bad)
    bad.write_text('[users.eve]\nrole = "viewer"\npassword = "plain"\n')
    with pytest.raises(sec.SecurityConfigError, match="exactly the keys role and password_hash"):
        sec.load_users(bad)

    cert = sec.ensure_server_certificate(pki.cfg, "urn:test:gw", "127.0.0.1")
    assert stat.S_IMODE(pki.cfg.own_key.stat().st_mode) == 0o600
    again = sec.ensure_server_certificate(pki.cfg, "urn:test:gw", "127.0.0.1")
    assert again.fingerprint(cert.signature_hash_algorithm) == cert.fingerprint(cert.signature_hash_algorithm)  # type: ignore[arg-type]
    other = sec.ensure_server_certificate(pki.cfg, "urn:test:other", "127.0.0.1")
    assert other.serial_number != cert.serial_number, "a certificate for another application URI is remade"


def test_secure_mode_needs_accounts_and_unsecured_mode_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgeline.opcua.security")
    empty = sec.SecurityConfig(tmp_path / "pki")

    async def scenario() -> None:
        with pytest.raises(sec.SecurityConfigError, match=r"users\.toml does not exist"):
            async with gateway(empty):
                pass
        async with gateway(None) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            await gw.opcua.flush()
            c = await connect(gw.opcua.endpoint)
            try:
                idx = await c.get_namespace_index("urn:edgeline:gateway")
                online = c.get_node(ua.NodeId("s1/l1/m1/Online", idx))
                assert await online.read_value() is True
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):  # not even in the demo
                    await online.write_value(ua.DataValue(ua.Variant(False, ua.VariantType.Boolean)))
            finally:
                await c.disconnect()

    asyncio.run(scenario())
    assert any("security is OFF" in r.getMessage() for r in caplog.records)


def test_client_identity_helper_trusts_only_when_asked(tmp_path: Path) -> None:
    cfg = sec.SecurityConfig(tmp_path / "pki")
    client_identity(tmp_path, "a", "u", "p", trust=cfg)
    client_identity(tmp_path, "b", "u", "p", trust=None)
    assert len(list(cfg.trusted_dir.glob("*.der"))) == 1


def test_config_section_and_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sec.security_from_config({"security": "none"}, base_dir=tmp_path) is None
    cfg = sec.security_from_config({}, base_dir=tmp_path)
    assert cfg is not None and cfg.pki_dir == tmp_path / "opcua-pki", "secure unless opted out"
    cfg = sec.security_from_config(
        {"pki_dir": "/etc/edgeline/pki", "users_file": "u.toml", "hostnames": ["gw.plant"]}, base_dir=tmp_path
    )
    assert (
        cfg is not None and cfg.pki_dir == Path("/etc/edgeline/pki") and cfg.users_path == tmp_path / "u.toml"
    )
    with pytest.raises(sec.SecurityConfigError, match=r"\[opcua\] security must be one of"):
        sec.security_from_config({"security": "basic"}, base_dir=tmp_path)
    with pytest.raises(sec.SecurityConfigError, match=r"\[opcua\] hostnames must be a list"):
        sec.security_from_config({"hostnames": "gw"}, base_dir=tmp_path)

    import argparse

    parser = argparse.ArgumentParser(prog="edgeline")
    sec.add_parser(parser.add_subparsers())
    pki = tmp_path / "pki"
    monkeypatch.setenv("EDGELINE_OPCUA_PASSWORD", "s3cret-pass")

    def run(*argv: str) -> int:
        args = parser.parse_args(["opcua", *argv])
        return int(args.func(args))

    assert run("user", "ops", "--role", "operator", "--pki", str(pki)) == 0
    acc = sec.load_users(pki / "users.toml")["ops"]
    assert acc.role == "operator" and sec.verify_password("s3cret-pass", acc.password_hash)
    assert (
        run(
            "client-cert",
            "--pki",
            str(pki),
            "--uri",
            "urn:scada",
            "--name",
            "scada",
            "--out",
            str(tmp_path / "c"),
        )
        == 0
    )
    assert (tmp_path / "c" / "cert.pem").exists() and len(list((pki / "trusted").glob("*.der"))) == 1
    other = client_identity(tmp_path, "other", "u", "p", trust=None)
    assert run("trust", str(other.cert), "--pki", str(pki)) == 0
    assert len(list((pki / "trusted").glob("*.der"))) == 2
    assert run("trust", str(tmp_path / "missing.der"), "--pki", str(pki)) == 2
