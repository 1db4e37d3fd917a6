"""Host code. Keys and X.509 certificates for `edgeline provision` (host/provision.py), on
the `cryptography` package. Kept apart so that the command line imports `cryptography` only
when it provisions.

EC P-256 (`ec`, the default) or RSA-2048 (`rsa`) keys; a CA with pathlen 0; leaf
certificates with serverAuth (the broker, with its names as SANs) or clientAuth (gateway and
nodes) extended key usage. CA and server certificates are valid from 2000-01-01: a board
whose clock was never set believes it is 2000 (MicroPython's epoch), and mbedtls would
otherwise reject the broker as "not yet valid" before NTP could run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPES = ("ec", "rsa")
_EPOCH_2000 = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_RSA_BITS = 2048
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(key_type: str) -> PrivateKey:
    """A fresh private key: EC P-256 (`ec`) or RSA-2048 (`rsa`).

    :raises ValueError: for another key type.
    """
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    raise ValueError(f"key type {key_type!r} is not supported: use one of {', '.join(KEY_TYPES)}")


def key_type_of(key: Any) -> str:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"


def _name(cn: str, site: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeline"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey, days: int, since: dt.datetime) -> Any:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(since)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(site: str, key: PrivateKey, days: int) -> x509.Certificate:
    name = _name(f"edgeline CA {site}", site)
    b = (
        _builder(name, name, key, days, _EPOCH_2000)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return b.sign(key, hashes.SHA256())


def issue(
    cn: str,
    site: str,
    key: PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    days: int,
    *,
    server_names: Sequence[str] = (),
) -> x509.Certificate:
    """A leaf certificate signed by the CA: a server certificate when `server_names` are
    given (serverAuth, with those SANs), otherwise a client certificate (clientAuth)."""
    since = _EPOCH_2000 if server_names else dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    b = (
        _builder(_name(cn, site), ca_cert.subject, key, days, since)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=rsa_key,
                data_encipherment=False,
                key_agreement=not rsa_key,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def der_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; expected an EC or RSA key")
    return key


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def der_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def load_pem_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cert_info(cert: x509.Certificate, key_type: str) -> dict[str, Any]:
    return {
        "sha256": fingerprint(cert),
        "key_type": key_type,
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


# -- broker configuration ---------------------------------------------------------------------
