"""Host code. OPC-UA security for the gateway: certificates, a trust list, user accounts, roles.

The secure configuration (the default of every production configuration) offers one endpoint,
Basic256Sha256 Sign&Encrypt, and nothing else:

- the server's own certificate and key live in ``<pki>/own/`` (made with `cryptography` on
  first start: RSA-2048, the application URI and host names as subject alternative names);
- a client's certificate must be in ``<pki>/trusted/`` (DER or PEM; a CA certificate there
  trusts what it issued; CRLs go in ``<pki>/crl/``). asyncua's default accepts every client
  certificate; here its `CertificateValidator` checks validity dates, the application URI,
  key usage and the trust list, and a refused certificate is copied to ``<pki>/rejected/`` so
  an administrator can trust it by moving the file. The trust list is re-read when its folder
  changes, without a restart;
- a session needs a user name and password from the users file (``<pki>/users.toml`` unless
  configured): salted scrypt hashes, never plain passwords. Anonymous sessions are refused, and
  so is a session whose secure channel carries no trusted certificate (a None channel always
  exists for GetEndpoints: no account can log in over it);
- roles: ``viewer`` reads, browses, subscribes and calls ConditionRefresh; ``operator`` may also
  Acknowledge alarms and add comments. Nobody writes to the address space over the network.

The unsecured mode (security policy None, anonymous, every role) is an explicit opt-out for the
demo and for tests; the server logs a warning when it runs that way.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from asyncua import ua
from asyncua.crypto.permission_rules import PermissionRuleset, User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.user_managers import UserManager
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from asyncua import Server

log = logging.getLogger("edgeline.opcua.security")


def _ns0(i: int) -> ua.NodeId:
    """A standard (namespace 0) NodeId; asyncua types the identifier as a NewType."""
    return ua.NodeId(ua.Int32(i))


ROLES = ("viewer", "operator")
# Methods that change an alarm: only operators may call them.
OPERATOR_METHODS = frozenset(
    _ns0(i)
    for i in (
        ua.ObjectIds.AcknowledgeableConditionType_Acknowledge,
        ua.ObjectIds.AcknowledgeableConditionType_Confirm,
        ua.ObjectIds.ConditionType_AddComment,
        ua.ObjectIds.ConditionType_Enable,
        ua.ObjectIds.ConditionType_Disable,
    )
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1  # ~50 ms per check on this machine; stored per hash
_MAX_REJECTED = 100  # certificates kept in rejected/ for an administrator to look at


class SecurityConfigError(ValueError):
    """A security file or setting is wrong; the message names the file or key."""


# -- the user of the request being processed ----------------------------------------------
# asyncua calls method callbacks without the session; the permission check runs just before
# in the same task, so it leaves the user here for Acknowledge to read (ClientUserId, role).
_current_user: contextvars.ContextVar[User | None] = contextvars.ContextVar(
    "edgeline_opcua_user", default=None
)


def current_user() -> User | None:
    """The user whose request is being processed (None outside a client request)."""
    return _current_user.get()


@dataclass
class EdgelineUser(User):
    """An authenticated account: asyncua's User with our roles."""

    roles: frozenset[str] = frozenset()


def user_name(user: User | None) -> str:
    if user is None:
        return ""
    return user.name or "anonymous"


def may_operate(user: User | None, *, enforce: bool) -> bool:
    """Whether `user` may acknowledge or comment alarms (anyone when roles are not enforced)."""
    if not enforce:
        return True
    return isinstance(user, EdgelineUser) and "operator" in user.roles


# -- passwords ------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    """A salted scrypt hash, `scrypt$N$r$p$salt$hash` (base64), for the users file."""
    if not password:
        raise ValueError("password must not be empty")
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(dk).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Check `password` against a `hash_password` string in constant time.

    :raises ValueError: when `encoded` is not a hash this module wrote.
    """
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("password hash must look like scrypt$N$r$p$salt$hash")
    n, r, p = (int(x) for x in parts[1:4])
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError(f"scrypt parameters N={n} r={r} p={p} are out of range")
    salt, want = base64.b64decode(parts[4]), base64.b64decode(parts[5])
    got = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want), maxmem=256 * n * r + (1 << 20)
    )
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str


def load_users(path: Path) -> dict[str, Account]:
    """Read a users file (TOML: one ``[users.NAME]`` table with ``role`` and ``password_hash``).

    :raises SecurityConfigError: naming the file and the entry that is wrong.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise SecurityConfigError(f"cannot read OPC-UA users file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise SecurityConfigError(f"OPC-UA users file {path} is not valid TOML: {e}") from e
    unknown = set(raw) - {"users"}
    if unknown:
        raise SecurityConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; only [users.NAME]")
    users = raw.get("users", {})
    if not isinstance(users, dict):
        raise SecurityConfigError(f"{path}: 'users' must be a table of [users.NAME] tables")
    out: dict[str, Account] = {}
    for name, entry in users.items():
        where = f"{path}: [users.{name}]"
        if not _NAME.match(name):
            raise SecurityConfigError(f"{where}: user names are 1-64 of A-Z a-z 0-9 _ . @ -")
        if not isinstance(entry, dict) or set(entry) != {"role", "password_hash"}:
            raise SecurityConfigError(f"{where} must have exactly the keys role and password_hash")
        if entry["role"] not in ROLES:
            raise SecurityConfigError(
                f"{where}: role must be one of {', '.join(ROLES)}, got {entry['role']!r}"
            )
        if not isinstance(entry["password_hash"], str) or not entry["password_hash"].startswith("scrypt$"):
            raise SecurityConfigError(
                f"{where}: password_hash must be a scrypt hash (edgeline.host.opcua_security.hash_password)"
            )
        out[name] = Account(name, entry["role"], entry["password_hash"])
    return out


def write_users(path: Path, accounts: Iterable[Account]) -> None:
    """Write a users file (mode 0600): names, roles and hashes, never passwords."""
    lines = [
        "# edgeline OPC-UA accounts: salted scrypt hashes (edgeline.host.opcua_security.hash_password).",
        f"# Roles: {', '.join(ROLES)}.",
        "",
    ]
    for a in sorted(accounts, key=lambda a: a.name):
        if not _NAME.match(a.name) or a.role not in ROLES:
            raise ValueError(f"account {a.name!r} with role {a.role!r} is not valid")
        lines += [f'[users."{a.name}"]', f'role = "{a.role}"', f'password_hash = "{a.password_hash}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Add or replace one account in the users file (created if absent)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not _NAME.match(name):
        raise ValueError(f"user name {name!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    accounts = load_users(path) if path.exists() else {}
    accounts[name] = Account(name, role, hash_password(password))
    write_users(path, accounts.values())


# -- certificates -----------------------------------------------------------------------------
def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_application_certificate(
    app_uri: str,
    common_name: str,
    *,
    client: bool,
    hostnames: Sequence[str] = (),
    days: int = 365 * 2,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed OPC-UA application instance certificate (Part 6 6.2.2) and its RSA-2048 key:
    the application URI as a URI SAN, host names/addresses as DNS/IP SANs, the key usages
    Basic256Sha256 needs, and clientAuth or serverAuth."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeline"),
        ]
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_certificate(
    cert: x509.Certificate, key: rsa.RSAPrivateKey, cert_path: Path, key_path: Path
) -> None:
    """Certificate as DER (what OPC-UA exchanges), key as unencrypted PKCS#8 PEM with mode 0600."""
    _write(cert_path, cert.public_bytes(serialization.Encoding.DER))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(key_path, pem, secret=True)


def _cert_uri(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex()  # OPC-UA thumbprints are SHA-1


# -- configuration ----------------------------------------------------------------------------
@dataclass
class SecurityConfig:
    """Where the secure configuration keeps its files. Layout under `pki_dir`:
    ``own/cert.der``, ``own/key.pem``, ``trusted/``, ``crl/``, ``rejected/``, ``users.toml``."""

    pki_dir: Path
    users_file: Path | None = None  # default: <pki_dir>/users.toml
    hostnames: list[str] = field(default_factory=list)  # extra SANs for the server certificate

    @property
    def own_cert(self) -> Path:
        return self.pki_dir / "own" / "cert.der"

    @property
    def own_key(self) -> Path:
        return self.pki_dir / "own" / "key.pem"

    @property
    def trusted_dir(self) -> Path:
        return self.pki_dir / "trusted"

    @property
    def crl_dir(self) -> Path:
        return self.pki_dir / "crl"

    @property
    def rejected_dir(self) -> Path:
        return self.pki_dir / "rejected"

    @property
    def users_path(self) -> Path:
        return self.users_file if self.users_file is not None else self.pki_dir / "users.toml"

    def trust(self, cert: x509.Certificate | Path) -> Path:
        """Put a client certificate in the trust list; returns where it went."""
        if isinstance(cert, Path):
            data = cert.read_bytes()
            cert = (
                x509.load_pem_x509_certificate(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data)
            )
        dest = self.trusted_dir / f"{fingerprint(cert)}.der"
        _write(dest, cert.public_bytes(serialization.Encoding.DER))
        return dest


def ensure_server_certificate(cfg: SecurityConfig, app_uri: str, host: str) -> x509.Certificate:
    """Load the server's certificate, or make one (and its key) when absent, expired, or made
    for another application URI."""
    names = list(dict.fromkeys([host, socket.gethostname(), "localhost", "127.0.0.1", *cfg.hostnames]))
    names = [n for n in names if n and n not in ("0.0.0.0", "::")]
    if cfg.own_cert.exists() and cfg.own_key.exists():
        cert = x509.load_der_x509_certificate(cfg.own_cert.read_bytes())
        fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        if fresh and app_uri in _cert_uri(cert):
            return cert
        log.warning(
            "OPC-UA server certificate %s is expired or not for %s: making a new one", cfg.own_cert, app_uri
        )
    cert, key = make_application_certificate(app_uri, "edgeline gateway", client=False, hostnames=names)
    write_certificate(cert, key, cfg.own_cert, cfg.own_key)
    log.info("made OPC-UA server certificate %s (sha1 %s)", cfg.own_cert, fingerprint(cert))
    return cert


class TrustList:
    """asyncua's TrustStore over ``trusted/`` and ``crl/``, re-read when either folder changes,
    with asyncua's CertificateValidator doing the checks (dates, URI, key usage, trust, CRL)."""

    def __init__(self, cfg: SecurityConfig) -> None:
        self.cfg = cfg
        cfg.trusted_dir.mkdir(parents=True, exist_ok=True)
        self._store = TrustStore([cfg.trusted_dir], [cfg.crl_dir] if cfg.crl_dir.is_dir() else [])
        self._validator = CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT,
            self._store,
        )
        self._stamp: tuple[float, ...] = ()

    def _mtimes(self) -> tuple[float, ...]:
        dirs = [self.cfg.trusted_dir, self.cfg.crl_dir]
        return tuple(d.stat().st_mtime_ns if d.is_dir() else -1 for d in dirs)

    async def reload_if_changed(self) -> None:
        stamp = self._mtimes()
        if stamp != self._stamp:
            self._stamp = stamp
            await self._store.load()
            log.info("OPC-UA trust list loaded from %s", self.cfg.trusted_dir)

    def is_trusted(self, der: bytes | None) -> bool:
        if not der:
            return False
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        return self._store.validate(cert)

    async def validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua's certificate validator hook (CreateSession): raises ServiceError when refused."""
        await self.reload_if_changed()
        try:
            await self._validator.validate(cert, app)
        except Exception as e:
            code = getattr(e, "code", None)
            why = ua.StatusCode(ua.UInt32(code)).name if isinstance(code, int) else type(e).__name__
            log.warning(
                "OPC-UA client certificate refused (%s): CN=%s URI=%s sha1=%s; "
                "to trust it, move it from %s to %s",
                why,
                _cn(cert),
                app.ApplicationUri,
                fingerprint(cert),
                self.cfg.rejected_dir,
                self.cfg.trusted_dir,
            )
            self._keep_rejected(cert)
            raise

    def _keep_rejected(self, cert: x509.Certificate) -> None:
        d = self.cfg.rejected_dir
        d.mkdir(parents=True, exist_ok=True)
        if sum(1 for _ in d.iterdir()) < _MAX_REJECTED:
            _write(d / f"{fingerprint(cert)}.der", cert.public_bytes(serialization.Encoding.DER))


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else "?"


class AccountManager(UserManager):
    """asyncua user manager: user name + password from the users file, and only over a secure
    channel whose client certificate is in the trust list."""

    def __init__(self, accounts: dict[str, Account], trust: TrustList) -> None:
        self.accounts = accounts
        self.trust = trust
        # Checked for unknown names too, so that timing does not tell which names exist.
        self._dummy = hash_password("edgeline-unknown-user")

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if not self.trust.is_trusted(certificate):
            log.warning("OPC-UA session refused: its secure channel has no trusted client certificate")
            return None
        if not username or password is None:
            log.warning("OPC-UA session refused: a user name and password are required")
            return None
        acc = self.accounts.get(username)
        ok = verify_password(password, acc.password_hash if acc else self._dummy)
        if acc is None or not ok:
            log.warning("OPC-UA login refused for user %r: unknown user or wrong password", username)
            return None
        return EdgelineUser(role=UserRole.User, name=acc.name, roles=frozenset(_ROLE_GRANTS[acc.role]))


_ROLE_GRANTS = {"viewer": ("viewer",), "operator": ("viewer", "operator")}

# Services any logged-in user may call (asyncua's user list without Write: nothing in our
# address space is written over the network).
_VIEWER_SERVICES = frozenset(
    _ns0(i)
    for i in (
        ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary,
        ua.ObjectIds.CloseSessionRequest_Encoding_DefaultBinary,
        ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary,
        ua.ObjectIds.ReadRequest_Encoding_DefaultBinary,
        ua.ObjectIds.BrowseRequest_Encoding_DefaultBinary,
        ua.ObjectIds.BrowseNextRequest_Encoding_DefaultBinary,
        ua.ObjectIds.GetEndpointsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.FindServersRequest_Encoding_DefaultBinary,
        ua.ObjectIds.TranslateBrowsePathsToNodeIdsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.CreateSubscriptionRequest_Encoding_DefaultBinary,
        ua.ObjectIds.ModifySubscriptionRequest_Encoding_DefaultBinary,
        ua.ObjectIds.DeleteSubscriptionsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.TransferSubscriptionsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.CreateMonitoredItemsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.ModifyMonitoredItemsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.DeleteMonitoredItemsRequest_Encoding_DefaultBinary,
        ua.ObjectIds.HistoryReadRequest_Encoding_DefaultBinary,
        ua.ObjectIds.PublishRequest_Encoding_DefaultBinary,
        ua.ObjectIds.RepublishRequest_Encoding_DefaultBinary,
        ua.ObjectIds.CloseSecureChannelRequest_Encoding_DefaultBinary,
        ua.ObjectIds.CallRequest_Encoding_DefaultBinary,
        ua.ObjectIds.SetMonitoringModeRequest_Encoding_DefaultBinary,
        ua.ObjectIds.SetPublishingModeRequest_Encoding_DefaultBinary,
        ua.ObjectIds.SetTriggeringRequest_Encoding_DefaultBinary,
        ua.ObjectIds.RegisterNodesRequest_Encoding_DefaultBinary,
        ua.ObjectIds.UnregisterNodesRequest_Encoding_DefaultBinary,
    )
)
_CALL = _ns0(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)


class RolePermissions(PermissionRuleset):
    """Which services a user may call: reading, browsing, subscribing and calling methods, never
    writing (Write, AddNodes, ...). With `enforce` False (the unsecured demo), any session may.

    It also records the user for the request in progress (see `current_user`): method
    callbacks check the operator role themselves, so a refused Acknowledge gets its own
    BadUserAccessDenied result rather than failing the whole Call request."""

    def __init__(self, *, enforce: bool) -> None:
        self.enforce = enforce

    def check_validity(self, user: User | None, action_type_id: ua.NodeId, body: Any) -> bool:
        _current_user.set(user)
        if not self.enforce:
            # Unsecured demo: any session may do what a viewer and an operator may; still no
            # writes to the address space over the network.
            return action_type_id in _VIEWER_SERVICES
        if not isinstance(user, EdgelineUser):
            return False
        if action_type_id == _CALL and "operator" not in user.roles:
            # Parse a copy: asyncua decodes the body again afterwards. A viewer's call of an
            # operator method is refused by the method itself; this only logs it.
            try:
                params = struct_from_binary(ua.CallParameters, body.copy())
            except Exception:
                return False
            for m in params.MethodsToCall:
                if m.MethodId in OPERATOR_METHODS:
                    log.warning("OPC-UA user %r (viewer) tried to call %s: refused", user.name, m.MethodId)
        return action_type_id in _VIEWER_SERVICES


async def apply_security(
    server: Server, cfg: SecurityConfig | None, *, app_uri: str, host: str
) -> RolePermissions:
    """Configure `server` (before `start`): the secure configuration from `cfg`, or with None,
    the unsecured demo mode (logged). Returns the permission rules in force."""
    if cfg is None:
        log.warning(
            "OPC-UA security is OFF (explicit opt-out): security policy None, anonymous access, "
            "every client may acknowledge alarms. Demo and tests only."
        )
        perms = RolePermissions(enforce=False)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity], permission_ruleset=cast(Any, perms))
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        return perms
    if not cfg.users_path.exists():
        raise SecurityConfigError(
            f"OPC-UA users file {cfg.users_path} does not exist: add an account with "
            f"`edgeline opcua user --pki {cfg.pki_dir} --role operator NAME`, "
            "or set [opcua] security = \"none\" to run without security (not for production)"
        )
    accounts = load_users(cfg.users_path)
    if not accounts:
        raise SecurityConfigError(f"OPC-UA users file {cfg.users_path} has no accounts: nobody could log in")
    ensure_server_certificate(cfg, app_uri, host)
    await server.load_certificate(str(cfg.own_cert))
    await server.load_private_key(str(cfg.own_key))
    trust = TrustList(cfg)
    await trust.reload_if_changed()
    perms = RolePermissions(enforce=True)
    # asyncua annotates SimpleRoleRuleset; it calls any PermissionRuleset's check_validity.
    server.set_security_policy(
        [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt], permission_ruleset=cast(Any, perms)
    )
    server.set_identity_tokens([ua.UserNameIdentityToken])
    server.set_certificate_validator(trust.validate)
    server.iserver.user_manager = AccountManager(accounts, trust)
    server.iserver.allow_remote_admin = False
    log.info(
        "OPC-UA security: Basic256Sha256 Sign&Encrypt, %d account(s) from %s, trust list %s",
        len(accounts),
        cfg.users_path,
        cfg.trusted_dir,
    )
    return perms


# -- configuration file and command line ---------------------------------------------------------
OPCUA_KEYS: dict[str, type] = {"security": str, "pki_dir": str, "users_file": str, "hostnames": list}
SECURITY_MODES = ("sign-and-encrypt", "none")


def security_from_config(
    section: dict[str, Any], *, base_dir: Path, where: str = "[opcua]"
) -> SecurityConfig | None:
    """The security part of a gateway config's ``[opcua]`` table: ``security`` is
    ``"sign-and-encrypt"`` (the default) or ``"none"`` (the explicit opt-out); ``pki_dir``
    (default ``<base_dir>/opcua-pki``), ``users_file``, ``hostnames`` (extra certificate SANs).
    Relative paths are relative to `base_dir`. Other keys of the table are not looked at.

    :raises SecurityConfigError: naming the key that is wrong.
    """
    mode = section.get("security", "sign-and-encrypt")
    if mode not in SECURITY_MODES:
        raise SecurityConfigError(
            f"{where} security must be one of {', '.join(SECURITY_MODES)}, got {mode!r}"
        )
    for key, typ in OPCUA_KEYS.items():
        if key in section and not isinstance(section[key], typ):
            raise SecurityConfigError(f"{where} {key} must be a {typ.__name__}, got {section[key]!r}")
    if mode == "none":
        return None
    hostnames = section.get("hostnames", [])
    if not all(isinstance(h, str) for h in hostnames):
        raise SecurityConfigError(f"{where} hostnames must be a list of strings, got {hostnames!r}")
    pki = base_dir / section.get("pki_dir", "opcua-pki")
    users = base_dir / section["users_file"] if "users_file" in section else None
    return SecurityConfig(pki, users, list(hostnames))


def add_parser(subparsers: Any) -> Any:
    """Register `edgeline opcua ...` on the CLI's subparsers (from `add_subparsers()`):
    ``user`` (add or replace an account), ``trust`` (put a client certificate in the trust
    list), ``client-cert`` (make a client identity, e.g. for a SCADA client or a test)."""
    import argparse

    p = subparsers.add_parser("opcua", help="the gateway's OPC-UA accounts and trust list")
    sub = p.add_subparsers(dest="opcua_cmd", required=True)
    pki = argparse.ArgumentParser(add_help=False)
    pki.add_argument(
        "--pki", type=Path, required=True, help="the gateway's OPC-UA PKI folder ([opcua] pki_dir)"
    )
    u = sub.add_parser(
        "user",
        parents=[pki],
        help="add or replace a user account (password asked, or $EDGELINE_OPCUA_PASSWORD)",
    )
    u.add_argument("name")
    u.add_argument("--role", choices=ROLES, required=True)
    u.add_argument("--users", type=Path, help="users file (default <pki>/users.toml)")
    u.set_defaults(func=_cli_user)
    t = sub.add_parser("trust", parents=[pki], help="trust a client certificate (DER or PEM)")
    t.add_argument("cert", type=Path)
    t.set_defaults(func=_cli_trust)
    c = sub.add_parser("client-cert", parents=[pki], help="make a client certificate and key, and trust it")
    c.add_argument("--uri", required=True, help="the client's application URI (must match its configuration)")
    c.add_argument("--name", required=True, help="common name")
    c.add_argument("--out", type=Path, required=True, help="folder for cert.der, cert.pem and key.pem")
    c.set_defaults(func=_cli_client_cert)
    return p


def _cli_user(args: Any) -> int:
    import getpass
    import sys

    cfg = SecurityConfig(args.pki, args.users)
    password = os.environ.get("EDGELINE_OPCUA_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
    try:
        add_user(cfg.users_path, args.name, args.role, password)
    except (ValueError, OSError) as e:
        print(f"edgeline opcua user: {e}", file=sys.stderr)
        return 2
    print(f"{args.name} ({args.role}) in {cfg.users_path}")
    return 0


def _cli_trust(args: Any) -> int:
    import sys

    try:
        dest = SecurityConfig(args.pki).trust(args.cert)
    except (ValueError, OSError) as e:
        print(f"edgeline opcua trust: {args.cert}: {e}", file=sys.stderr)
        return 2
    print(f"trusted: {dest}")
    return 0


def _cli_client_cert(args: Any) -> int:
    cert, key = make_application_certificate(
        args.uri, args.name, client=True, hostnames=[socket.gethostname()]
    )
    write_certificate(cert, key, args.out / "cert.der", args.out / "key.pem")
    _write(args.out / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    dest = SecurityConfig(args.pki).trust(cert)
    print(f"client certificate {args.out / 'cert.der'} (URI {args.uri}), trusted as {dest}")
    return 0
