"""Interop with an independent OPC-UA stack: node-opcua browses the hierarchy and reads values,
unsecured and under Basic256Sha256 Sign&Encrypt with a user account.

node-opcua-client (pinned in tests/interop/package-lock.json) is installed with `npm ci` into
a cache folder on first use (~15 s; EDGELINE_NODE_OPCUA_DIR overrides where). Without node and
npm the tests fail and say how to install them; EDGELINE_ALLOW_MISSING_INTEROP=1 turns that
into a skip for a quick local run."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from opcua_pki import birth, client_identity, gateway, make_pki, send, window

pytestmark = pytest.mark.timeout(180)
INTEROP = Path(__file__).resolve().parents[1] / "interop"
PATHS = ["s1/l1/m1/vibration/Score", "s1/l1/m1/vibration/rms", "s1/l1/m1/Health", "s1/l1/m1/Online"]


def _missing(what: str) -> None:
    msg = f"{what}: install Node.js and npm (Debian: apt-get install nodejs npm) for these interop tests"
    if os.environ.get("EDGELINE_ALLOW_MISSING_INTEROP") == "1":
        pytest.skip(msg)
    pytest.fail(msg)


@pytest.fixture(scope="module")
def node_opcua() -> Path:
    """The folder whose node_modules holds node-opcua-client (installed on first use)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _missing("node or npm is not on PATH")
    lock = (INTEROP / "package-lock.json").read_bytes()
    default = Path.home() / ".cache" / "edgeline" / f"node-opcua-{hashlib.sha256(lock).hexdigest()[:12]}"
    where = Path(os.environ.get("EDGELINE_NODE_OPCUA_DIR", default))
    if not (where / "node_modules" / "node-opcua-client" / "package.json").exists():
        where.mkdir(parents=True, exist_ok=True)
        for f in ("package.json", "package-lock.json"):
            shutil.copy(INTEROP / f, where / f)
        r = subprocess.run(
            [str(npm), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            pytest.fail(f"npm ci of node-opcua-client in {where} failed:\n{r.stdout}\n{r.stderr}")
    return where


async def _run_client(modules: Path, opts: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, NODE_PATH=str(modules / "node_modules"))
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(INTEROP / "browse_read.js"),
        json.dumps(opts),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    marked = [ln for ln in out.decode().splitlines() if ln.startswith("EDGELINE_RESULT ")]
    assert marked, (
        f"node-opcua printed no result; stdout:\n{out.decode()[-3000:]}\nstderr:\n{err.decode()[-3000:]}"
    )
    res: dict[str, Any] = json.loads(marked[-1].split(" ", 1)[1])
    return res


def _check_browse(res: dict[str, Any]) -> None:
    assert res["ok"], res
    ns = res["namespaceIndex"]
    assert ns > 0
    assert "s1" in {o["name"] for o in res["objects"]}
    assert [x["name"] for x in res["site"]] == ["l1"]
    assert {x["name"] for x in res["line"]} == {"m1"}
    assert res["line"][0]["typeDefinition"] == f"ns={ns};s=MachineType"
    machine = {x["name"]: x for x in res["machine"]}
    assert {"Online", "Anomaly", "Score", "LastTraceId", "Health", "AnomalyAlarm", "vibration"} <= set(
        machine
    )
    assert machine["vibration"]["typeDefinition"] == f"ns={ns};s=SensorType"
    assert machine["vibration"]["nodeId"] == f"ns={ns};s=s1/l1/m1/vibration"
    vals = res["values"]
    assert vals["s1/l1/m1/vibration/Score"] == {"value": 1.25, "status": "Good"}
    assert vals["s1/l1/m1/vibration/rms"] == {"value": 1.25, "status": "Good"}
    assert vals["s1/l1/m1/Health"] == {"value": "Normal", "status": "Good"}
    assert vals["s1/l1/m1/Online"] == {"value": True, "status": "Good"}


def test_node_opcua_browses_and_reads_unsecured(node_opcua: Path, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with gateway(None) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            await send(gw, "n1", "evt", window("n1", 1, 1.25))
            await gw.opcua.flush()
            return await _run_client(
                node_opcua,
                {
                    "endpoint": gw.opcua.endpoint,
                    "security": "None",
                    "pkiDir": str(tmp_path / "node-pki"),
                    "applicationUri": "urn:edgeline:test:node-opcua",
                    "paths": PATHS,
                },
            )

    _check_browse(asyncio.run(scenario()))


def test_node_opcua_under_sign_and_encrypt(node_opcua: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    # node-opcua reads PEM; the same identity, trusted by the gateway.
    ident = client_identity(tmp_path, "node-opcua", "olga", "operator-pw-1", trust=pki.cfg)
    pem = tmp_path / "node-opcua-cert.pem"
    cert = x509.load_der_x509_certificate(ident.cert.read_bytes())
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with gateway(pki.cfg) as gw:
            await send(gw, "n1", "birth", birth("n1", "m1"))
            await send(gw, "n1", "evt", window("n1", 1, 1.25))
            await gw.opcua.flush()
            opts = {
                "endpoint": gw.opcua.endpoint,
                "security": "Basic256Sha256",
                "pkiDir": str(tmp_path / "node-pki"),
                "certFile": str(pem),
                "keyFile": str(ident.key),
                "applicationUri": ident.app_uri,
                "serverCertFile": str(pki.cfg.own_cert),
                "user": ident.username,
                "password": ident.password,
                "paths": PATHS,
            }
            good = await _run_client(node_opcua, opts)
            wrong_pw = await _run_client(
                node_opcua, {**opts, "password": "not-it", "pkiDir": str(tmp_path / "p2")}
            )
            anonymous = await _run_client(node_opcua, {**opts, "user": None, "pkiDir": str(tmp_path / "p3")})
            return good, wrong_pw, anonymous

    good, wrong_pw, anonymous = asyncio.run(scenario())
    _check_browse(good)
    assert not wrong_pw["ok"] and "BadUserAccessDenied" in wrong_pw["error"], wrong_pw
    # node-opcua refuses on its own (the gateway offers no anonymous token policy); the
    # gateway's own refusal of anonymous sessions is in test_opcua_security.
    assert not anonymous["ok"] and "ANONYMOUS" in anonymous["error"], anonymous
