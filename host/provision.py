"""Host code. `edgeline provision`: the PKI and broker ACLs for MQTT over mutual TLS.

One output folder per site holds everything a deployment needs:

    <out>/
      manifest.json              site, key types, every identity with its fingerprint and expiry
      ca/ca.crt.pem              the site CA (trust anchor for broker, gateway and nodes)
      ca/ca.key.pem              its private key (0600): keep it offline once provisioning is done
      broker/server.crt.pem      the broker's certificate (serverAuth; SANs: --broker-host names,
      broker/server.key.pem        127.0.0.1, localhost), PEM for Mosquitto
      broker/acl.conf            Mosquitto ACL: each node publishes only under its own topics
      broker/mosquitto-tls.conf  a listener block to include in mosquitto.conf
      gateway/gateway.crt.pem    the gateway's client certificate (CN `_gateway`), PEM for paho
      gateway/gateway.key.pem
      gateway/ca.crt.pem
      gateway/device-keys.json   the southbound key store (0600): every node's 32-byte HMAC key,
                                   {"version": 1, "keys": {"<node>": "<64 hex digits>"}}
      nodes/<node>/config.json   the node's config, pointing at the files beside it
      nodes/<node>/ca.der        DER: MicroPython's TLS takes DER only ("invalid cert" on PEM)
      nodes/<node>/client.der
      nodes/<node>/client.key.der  PKCS#8, unencrypted (0600)
      nodes/<node>/device.key    the node's southbound key, 64 hex digits (0600): the same key
                                   as the gateway's store holds for it (config `southbound.key`)

Identities are certificate common names; Mosquitto maps them to user names
(`use_identity_as_username true`), and the ACL grants by user name. Node ids cannot start
with `_` (docs/wire-format.md), so no node can ever be named like the gateway (`_gateway`).

Running it again on the same folder keeps the CA and every existing key (adding nodes does not
invalidate deployed ones); `--renew` reissues the certificates (and keys) named on the command
line. EC P-256 is the default key type; `--key-type rsa` makes RSA-2048 keys. MicroPython's
mbedtls handles both in a client-certificate handshake with Mosquitto (DESIGN.md).

Southbound keys (docs/southbound.md) authenticate model and config pushes per device. The
gateway's store is the reference: a run keeps every key in it, writes each named node's key
into its bundle, and makes a key only for a node that has none. It never rotates one on its
own, not even with `--renew` (a certificate renewal must not break pushes): only
`--rotate-southbound-key` does, for the nodes named on the command line. A bundle key that
differs from the store's stops the run before anything is written; a bundle key the store
lacks (a store lost or not copied) is taken into the store, since the node already holds it.
The manifest names each node's key by `key_id` (16 hex digits of its sha256), never the key.

Keys and certificates are made by host/pki.py (imported only when provisioning, so the rest
of the command line does not pay for `cryptography`). Private keys are written 0600: a
Mosquitto running as its own user needs its key file given to that user.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeline.firmware.edgeline_node import wire

if TYPE_CHECKING:  # imported when provisioning: the rest of the command line skips paho, cbor2
    from edgeline.host.southbound import DeviceKeys

KEY_TYPES = ("ec", "rsa")  # host/pki.py makes them; the same names, without importing it
GATEWAY_CN = "_gateway"
BROKER_CN = "edgeline-broker"
DEFAULT_BROKER_HOSTS = ("127.0.0.1", "localhost")
MANIFEST = "manifest.json"
NODE_KEY_FILE = "device.key"  # in the bundle, beside config.json (its `southbound.key`)
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class ProvisionError(ValueError):
    """Bad arguments or an output folder that does not fit them; the message says which."""


@dataclass(frozen=True)
class NodeSpec:
    """One node: its id (the certificate CN, MQTT user and client id) and where it sits."""

    node_id: str
    line: str = "line-1"
    machine: str | None = None  # defaults to the node id

    def __post_init__(self) -> None:
        for what, value in (("node id", self.node_id), ("line", self.line), ("machine", self.machine)):
            if value is not None and not wire.valid_name(value):
                raise ProvisionError(
                    f"{what} {value!r} is not a valid name: 1-32 characters of A-Z a-z 0-9 _ - "
                    "not starting with '_' (they become MQTT topic levels)"
                )

    @classmethod
    def parse(cls, text: str, default_line: str) -> NodeSpec:
        """`node-1`, `node-1=pump-01` (machine) or `node-1=line-2/pump-01` (line and machine).

        :raises ProvisionError: on a bad name.
        """
        node, _, where = text.partition("=")
        line, machine = default_line, None
        if where:
            if "/" in where:
                line, _, machine = where.partition("/")
            else:
                machine = where
        return cls(node, line, machine)


@dataclass(frozen=True)
class Layout:
    """Where `provision` writes each file, under `out`."""

    out: Path

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca" / "ca.crt.pem"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca" / "ca.key.pem"

    @property
    def server_cert(self) -> Path:
        return self.out / "broker" / "server.crt.pem"

    @property
    def server_key(self) -> Path:
        return self.out / "broker" / "server.key.pem"

    @property
    def acl(self) -> Path:
        return self.out / "broker" / "acl.conf"

    @property
    def mosquitto_conf(self) -> Path:
        return self.out / "broker" / "mosquitto-tls.conf"

    @property
    def gateway_cert(self) -> Path:
        return self.out / "gateway" / "gateway.crt.pem"

    @property
    def gateway_key(self) -> Path:
        return self.out / "gateway" / "gateway.key.pem"

    @property
    def gateway_ca(self) -> Path:
        return self.out / "gateway" / "ca.crt.pem"

    @property
    def device_keys(self) -> Path:
        """The gateway's southbound key store (host/southbound.py `DeviceKeys`)."""
        return self.out / "gateway" / "device-keys.json"

    def node_dir(self, node_id: str) -> Path:
        return self.out / "nodes" / node_id

    def node_config(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "config.json"

    def node_key(self, node_id: str) -> Path:
        return self.node_dir(node_id) / NODE_KEY_FILE


# -- files ----------------------------------------------------------------------------------------
def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def acl_text(site: str, node_ids: Iterable[str], gateway_cn: str = GATEWAY_CN) -> str:
    """The Mosquitto ACL: per user (= certificate CN), what it may write and read.

    A node writes only `edgeline/v1/{site}/{node}/#` and reads its own `cmd/#` and the
    gateway's retained `state`. Clients without a certificate identity match no `user`
    block and get no access at all (there are no rules before the first `user` line).
    """
    root = f"{wire.TOPIC_ROOT}/{site}"
    lines = [
        "# Written by `edgeline provision`; regenerated on every run: edit the manifest, not this.",
        "# Users are certificate common names (use_identity_as_username true). A client",
        "# without a certificate identity matches no block below and can do nothing.",
        "",
        f"user {gateway_cn}",
        f"topic read {root}/#",
        f"topic write {root}/{wire.GATEWAY_NODE}/#",
        f"topic write {root}/+/cmd/#",
    ]
    for node in sorted(set(node_ids)):
        lines += [
            "",
            f"user {node}",
            f"topic write {root}/{node}/#",
            f"topic read {root}/{node}/cmd/#",
            f"topic read {root}/{wire.GATEWAY_NODE}/state",
        ]
    return "\n".join(lines) + "\n"


def mosquitto_tls_lines(layout: Layout, port: int, bind: str = "127.0.0.1") -> list[str]:
    """A Mosquitto listener block for mutual TLS with this folder's files (absolute paths).

    Listener options apply to the `listener` line before them; `acl_file` is global (with
    Mosquitto's default `per_listener_settings false`): it applies to every listener.
    """
    out = layout.out.resolve()
    lay = Layout(out)
    return [
        f"listener {port} {bind}",
        f"cafile {lay.ca_cert}",
        f"certfile {lay.server_cert}",
        f"keyfile {lay.server_key}",
        "require_certificate true",
        "use_identity_as_username true",
        # The client id becomes the certificate's CN too: node-1 cannot connect as node-2,
        # take over node-2's session or knock it offline (a client id takeover).
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        f"acl_file {lay.acl}",
    ]


def node_config(
    spec: NodeSpec, site: str, broker_host: str, broker_port: int, keepalive: int
) -> dict[str, Any]:
    """The node's config.json (firmware/edgeline_node/config.py): TLS and southbound key file
    names are relative to the config file's folder."""
    return {
        "node_id": spec.node_id,
        "site": site,
        "line": spec.line,
        "machine": spec.machine or spec.node_id,
        "broker": {
            "host": broker_host,
            "port": broker_port,
            "user": None,
            "password": None,
            "keepalive": keepalive,
            "tls": {"ca": "ca.der", "cert": "client.der", "key": "client.key.der"},
        },
        "southbound": {"key": NODE_KEY_FILE},
    }


# -- the whole run ----------------------------------------------------------------------------
@dataclass
class Options:
    out: Path
    site: str
    nodes: Sequence[NodeSpec]
    key_type: str = "ec"
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    broker_names: Sequence[str] = ()
    listen: str = "127.0.0.1"
    keepalive: int = 30
    days: int = 825
    ca_days: int = 3650
    renew: bool = False
    rotate_southbound_key: bool = False  # a new southbound key for each node in `nodes`


def _check(opts: Options) -> None:
    if not wire.valid_name(opts.site):
        raise ProvisionError(f"site {opts.site!r} is not a valid name: 1-32 of A-Z a-z 0-9 _ -")
    if opts.key_type not in KEY_TYPES:
        raise ProvisionError(
            f"key type {opts.key_type!r} is not supported: use one of {', '.join(KEY_TYPES)}"
        )
    if not 1 <= opts.broker_port <= 65535:
        raise ProvisionError(f"broker port {opts.broker_port} is not a TCP port")
    if not 5 <= opts.keepalive <= 3600:
        raise ProvisionError(f"keepalive {opts.keepalive} must be 5..3600 s (the node config's range)")
    if not 1 <= opts.days <= opts.ca_days:
        raise ProvisionError(f"--days {opts.days} must be from 1 to the CA's lifetime ({opts.ca_days})")
    if opts.rotate_southbound_key and not opts.nodes:
        raise ProvisionError("--rotate-southbound-key needs the nodes to rotate, named with --node")
    ids = [n.node_id for n in opts.nodes]
    if len(set(ids)) != len(ids):
        raise ProvisionError(f"a node id is given twice: {sorted(ids)}")
    for h in (opts.broker_host, *opts.broker_names):
        try:
            ipaddress.ip_address(h)
        except ValueError:
            if not _HOSTNAME.match(h):
                raise ProvisionError(f"broker name {h!r} is neither an IP address nor a host name") from None


def _read_node_key(path: Path) -> bytes:
    from edgeline.firmware.edgeline_node import southbound as node_sb

    try:
        key: bytes = node_sb.load_key(str(path))  # exactly as the node reads it
        return key
    except (OSError, ValueError) as e:
        raise ProvisionError(
            f"cannot read the node key {path}: {e}; delete it to have it written again from the "
            "gateway's store, or rotate it (--rotate-southbound-key)"
        ) from e


def southbound_keys(lay: Layout, nodes: Sequence[NodeSpec], rotate: bool) -> DeviceKeys:
    """The gateway's store with a key for every node in `nodes`, not written yet.

    Kept: every key the store has. Added: a bundle's key the store lacks, else a random one.
    Replaced: only with `rotate`, by a random one.

    :raises ProvisionError: the store cannot be read, or a bundle's key is unreadable or
        differs from the store's (nothing is written then).
    """
    from edgeline.host.southbound import KEY_BYTES, DeviceKeys, SouthboundError, key_id

    try:
        keys = DeviceKeys.load(lay.device_keys) if lay.device_keys.exists() else DeviceKeys()
    except SouthboundError as e:
        raise ProvisionError(f"{e}: fix or restore it; deleting it means new keys for every node") from e
    for spec in nodes:
        node = spec.node_id
        if rotate:
            keys.keys[node] = secrets.token_bytes(KEY_BYTES)
            continue
        on_node = _read_node_key(lay.node_key(node)) if lay.node_key(node).exists() else None
        have = keys.keys.get(node)
        if have is None:
            keys.keys[node] = on_node if on_node is not None else secrets.token_bytes(KEY_BYTES)
        elif on_node is not None and on_node != have:
            raise ProvisionError(
                f"the southbound key in {lay.node_key(node)} (key id {key_id(on_node)}) is not the one "
                f"{lay.device_keys} holds for {node} (key id {key_id(have)}): one was replaced by hand "
                f"or copied from another site. Give the node a new key with --rotate-southbound-key "
                f"--node {node}, then copy its bundle to the board again"
            )
    return keys


def provision(opts: Options) -> dict[str, Any]:
    """Create or extend the site's folder; return the manifest it wrote.

    :raises ProvisionError: on bad options, or a folder made for another site.
    """
    _check(opts)
    from edgeline.host import pki  # `cryptography`, only when provisioning
    from edgeline.host.southbound import key_id

    lay = Layout(opts.out)
    manifest: dict[str, Any] = {"site": opts.site, "nodes": {}}
    if lay.manifest.exists():
        manifest = json.loads(lay.manifest.read_text())
        if manifest.get("site") != opts.site:
            raise ProvisionError(
                f"{lay.out} was provisioned for site {manifest.get('site')!r}, not {opts.site!r}: "
                "use one folder per site"
            )
    elif lay.out.exists() and any(lay.out.iterdir()):
        raise ProvisionError(f"{lay.out} exists, is not empty and has no {MANIFEST}: pick an empty folder")
    # Before any file is written: a key that does not match stops the run here.
    keys = southbound_keys(lay, opts.nodes, opts.rotate_southbound_key)

    # The CA: made once, then reused so that adding a node keeps every deployed one valid.
    if lay.ca_key.exists() and lay.ca_cert.exists():
        try:
            ca_key = pki.load_key(lay.ca_key)
        except ValueError as e:
            raise ProvisionError(f"cannot use the CA key {lay.ca_key}: {e}") from e
        ca_cert = pki.load_pem_cert(lay.ca_cert)
    else:
        ca_key = pki.new_key(opts.key_type)
        ca_cert = pki.make_ca(opts.site, ca_key, opts.ca_days)
        _write(lay.ca_key, pki.pem_key(ca_key), secret=True)
        _write(lay.ca_cert, pki.pem_cert(ca_cert))
    manifest["ca"] = pki.cert_info(ca_cert, pki.key_type_of(ca_key))
    ca_pem = pki.pem_cert(ca_cert)
    ca_der = pki.der_cert(ca_cert)

    # The broker's server certificate: every name a client may use to reach it.
    names = list(dict.fromkeys([opts.broker_host, *opts.broker_names, *DEFAULT_BROKER_HOSTS]))
    old_names = manifest.get("broker", {}).get("names")
    if opts.renew or not lay.server_cert.exists() or old_names != names:
        key = pki.new_key(opts.key_type)
        cert = pki.issue(BROKER_CN, opts.site, key, ca_cert, ca_key, opts.days, server_names=names)
        _write(lay.server_key, pki.pem_key(key), secret=True)
        _write(lay.server_cert, pki.pem_cert(cert))
        manifest["broker"] = {**pki.cert_info(cert, opts.key_type), "names": names}
    manifest["broker"].update(host=opts.broker_host, port=opts.broker_port, listen=opts.listen)

    # The gateway's client identity.
    if opts.renew or not lay.gateway_cert.exists():
        key = pki.new_key(opts.key_type)
        cert = pki.issue(GATEWAY_CN, opts.site, key, ca_cert, ca_key, opts.days)
        _write(lay.gateway_key, pki.pem_key(key), secret=True)
        _write(lay.gateway_cert, pki.pem_cert(cert))
        manifest["gateway"] = {**pki.cert_info(cert, opts.key_type), "cn": GATEWAY_CN}
    _write(lay.gateway_ca, ca_pem)
    # The southbound key store, before the bundles: a run cut short leaves no node holding a
    # key the gateway lacks (the next run writes the missing bundle keys from the store).
    keys.save(lay.device_keys)
    manifest.setdefault("gateway", {})["device_keys"] = str(lay.device_keys.relative_to(lay.out))

    # The nodes: DER for MicroPython, the southbound key, and a config.json pointing at them.
    for spec in opts.nodes:
        d = lay.node_dir(spec.node_id)
        have = (d / "client.der").exists() and (d / "client.key.der").exists()
        if opts.renew or not have or spec.node_id not in manifest["nodes"]:
            key = pki.new_key(opts.key_type)
            cert = pki.issue(spec.node_id, opts.site, key, ca_cert, ca_key, opts.days)
            _write(d / "client.key.der", pki.der_key(key), secret=True)
            _write(d / "client.der", pki.der_cert(cert))
            manifest["nodes"][spec.node_id] = pki.cert_info(cert, opts.key_type)
        manifest["nodes"][spec.node_id].update(
            line=spec.line,
            machine=spec.machine or spec.node_id,
            southbound_key_id=key_id(keys.key_for(spec.node_id)),
        )
        keys.write_node_key(spec.node_id, lay.node_key(spec.node_id))
        _write(d / "ca.der", ca_der)
        cfg = node_config(spec, opts.site, opts.broker_host, opts.broker_port, opts.keepalive)
        _write(lay.node_config(spec.node_id), (json.dumps(cfg, indent=2) + "\n").encode())

    # Broker configuration from every node provisioned so far, not only this run's.
    _write(lay.acl, acl_text(opts.site, manifest["nodes"]).encode())
    conf = mosquitto_tls_lines(lay, opts.broker_port, opts.listen)
    head = [
        "# Written by `edgeline provision`: include this in mosquitto.conf (or pass it with -c",
        "# after your own settings). Set queue limits deliberately too (see DESIGN.md).",
    ]
    _write(lay.mosquitto_conf, ("\n".join(head + conf) + "\n").encode())
    _write(lay.manifest, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


# -- the command line -------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    try:
        nodes = [NodeSpec.parse(n, args.line) for n in args.node]
        opts = Options(
            out=args.out,
            site=args.site,
            nodes=nodes,
            key_type=args.key_type,
            broker_host=args.broker_host,
            broker_port=args.broker_port,
            broker_names=args.broker_name,
            listen=args.listen,
            keepalive=args.keepalive,
            days=args.days,
            renew=args.renew,
            rotate_southbound_key=args.rotate_southbound_key,
        )
        manifest = provision(opts)
    except (ProvisionError, OSError) as e:
        print(f"edgeline provision: {e}", file=sys.stderr)
        return 2
    lay = Layout(args.out)
    print(f"site {manifest['site']}: CA {lay.ca_cert}")
    print(f"  broker: include {lay.mosquitto_conf} (ACL {lay.acl})")
    print(f"  gateway: {lay.gateway_cert}, southbound keys {lay.device_keys}")
    for node in sorted(manifest["nodes"]):
        kid = manifest["nodes"][node].get("southbound_key_id", "none: name the node again")
        print(f"  node {node}: {lay.node_config(node)} (southbound key id {kid})")
    if args.rotate_southbound_key:
        print(
            "New southbound keys: copy each rotated node's device.key to its board and restart it, "
            "and restart the gateway; until then pushes to it are refused (bad-tag)."
        )
    print(f"Keep {lay.ca_key} offline: anyone with it can mint identities.")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `edgeline provision` on the CLI's subparsers (from `add_subparsers()`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "provision",
        help="make the CA, broker/gateway/node certificates, broker ACL and node config bundles",
        description="Make (or extend) a site's PKI for MQTT over mutual TLS: a CA, the broker's "
        "server certificate, a gateway client certificate, per-node client certificates and keys "
        "(DER, for MicroPython), per-node southbound keys (gateway/device-keys.json and each "
        "bundle's device.key), a Mosquitto ACL that lets each node publish only under "
        "edgeline/v1/{site}/{node}/#, a Mosquitto listener block, and each node's config.json.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder, one per site (created)")
    p.add_argument("--site", required=True, help="site name (topic level edgeline/v1/{site}/...)")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="ID[=MACHINE|=LINE/MACHINE]",
        help="a node to provision; repeat for more (machine defaults to the node id)",
    )
    p.add_argument("--line", default="line-1", help="line for nodes that do not name one (default line-1)")
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec", help="ec = P-256 (default), rsa = RSA-2048")
    p.add_argument(
        "--broker-host",
        default="127.0.0.1",
        help="the name or address nodes connect to; it goes into the broker certificate (default 127.0.0.1)",
    )
    p.add_argument(
        "--broker-name",
        action="append",
        default=[],
        help="a further name or address for the broker certificate; repeat for more",
    )
    p.add_argument("--broker-port", type=int, default=8883, help="TLS listener port (default 8883)")
    p.add_argument("--listen", default="127.0.0.1", help="address the TLS listener binds (default 127.0.0.1)")
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive in the node configs (s)")
    p.add_argument("--days", type=int, default=825, help="lifetime of leaf certificates (default 825)")
    p.add_argument(
        "--renew",
        action="store_true",
        help="reissue the broker's, the gateway's and the named nodes' certificates and keys (the CA "
        "and the southbound keys stay)",
    )
    p.add_argument(
        "--rotate-southbound-key",
        action="store_true",
        help="give the named nodes new southbound (push-signing) keys, in the gateway's store and "
        "their bundles; copy each bundle's device.key to its board again",
    )
    p.set_defaults(func=_run)
    return p
