# Device code. TLS client contexts for the node's MQTT client, from DER files.
#
# What MicroPython 1.29's `ssl` (mbedtls; micropython-lib's ssl.py over the built-in `tls`)
# accepts, measured on the unix port against Mosquitto 2.0 with `require_certificate true`:
# - certificates and keys in DER only (PEM fails with "invalid cert" / "invalid key"); keys
#   as unencrypted PKCS#8 (what `edgeline provision` writes), EC P-256 or RSA-2048;
# - load_cert_chain(cert, key) and load_verify_locations(cadata=...) take the DER bytes (or
#   a file path, which ssl.py reads whole); one CA certificate, not a bundle;
# - SSLContext(PROTOCOL_TLS_CLIENT) starts with verify_mode CERT_NONE, unlike CPython's:
#   without CERT_REQUIRED the broker's certificate is not checked at all. Set here, always;
# - with CERT_REQUIRED it checks server_hostname against the certificate (a DNS name, or
#   127.0.0.1 against an IP SAN) and raises ValueError, not OSError, for a certificate it
#   rejects ("...does not match with the expected CN", "...not correctly signed by the
#   trusted CA"); the MQTT client turns that into MQTTError so the node retries;
# - a broker that requires a client certificate and gets none ends the handshake: OSError.
#
# Under CPython (unit tests, tools) the same DER files work: CPython's ssl takes DER CA data,
# and a client certificate/key pair goes through a short-lived PEM file.
from .compat import IS_MICROPYTHON


class TLSConfigError(ValueError):
    """A TLS file is missing or unusable; the message names it."""


def join(base_dir, name):
    """`name` relative to `base_dir` (the config file's folder), unless absolute."""
    if not base_dir or name.startswith("/"):
        return name
    return base_dir.rstrip("/") + "/" + name


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError("cannot read the %s file %r: %s" % (what, path, e))


def client_context(ca_der, cert_der=None, key_der=None):
    """A TLS client context that verifies the broker against the CA certificate `ca_der`
    and, when given, presents the client certificate `cert_der` with its key `key_der`
    (all DER bytes). Raises ValueError for data the TLS stack cannot load."""
    if (cert_der is None) != (key_der is None):
        raise TLSConfigError("a client certificate needs its key, and a key its certificate")
    if IS_MICROPYTHON:
        try:
            import ssl
        except ImportError:  # a port built without TLS, or the frozen ssl.py not on the path
            raise TLSConfigError("this MicroPython has no ssl module: it cannot do MQTT over TLS")

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED  # not the default on MicroPython: see above
        ctx.load_verify_locations(cadata=ca_der)
        if cert_der is not None:
            ctx.load_cert_chain(cert_der, key_der)
        return ctx
    return _cpython_context(ca_der, cert_der, key_der)


def _pem(der, label):
    import binascii

    b64 = binascii.b2a_base64(der).replace(b"\n", b"")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, b"\n".join(lines), label)


def _cpython_context(ca_der, cert_der, key_der):  # pragma: no cover - host side only
    import os
    import ssl
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks
    try:
        ctx.load_verify_locations(cadata=bytes(ca_der))
    except ssl.SSLError as e:
        raise ValueError("invalid CA certificate: %s" % e)
    if cert_der is not None:
        fd, path = tempfile.mkstemp(suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_pem(cert_der, b"CERTIFICATE") + _pem(key_der, b"PRIVATE KEY"))
            try:
                ctx.load_cert_chain(path)
            except ssl.SSLError as e:
                raise ValueError("invalid client certificate or key: %s" % e)
        finally:
            os.remove(path)
    return ctx


def from_config(tls_cfg, base_dir=""):
    """The context for a node config's `broker.tls` section ({"ca", "cert", "key"}: DER
    file names, relative to `base_dir`), or None when the section is None (plain MQTT)."""
    if tls_cfg is None:
        return None
    ca = join(base_dir, tls_cfg["ca"])
    cert = tls_cfg.get("cert")
    key = tls_cfg.get("key")
    ca_der = _read(ca, "CA certificate (broker.tls.ca)")
    cert_der = None if cert is None else _read(join(base_dir, cert), "client certificate (broker.tls.cert)")
    key_der = None if key is None else _read(join(base_dir, key), "client key (broker.tls.key)")
    try:
        return client_context(ca_der, cert_der, key_der)
    except ValueError as e:
        raise TLSConfigError("cannot load the TLS files %s, %s, %s (DER expected; `edgeline provision` "
                             "writes them): %s" % (ca, cert, key, str(e).strip() or repr(e)))


class LazyContext:
    """The context for `broker.tls`, built when a connection first needs it and again at
    every connect until it loads: a node whose TLS files are wrong (or arrive later) keeps
    measuring into its queue, and each failed attempt says why. load() builds it at once
    (the node tries at boot, to report a bad file early). An MQTTClient takes this object
    as its ssl_context; a TLSConfigError from wrap_socket() is a failed handshake to it."""

    def __init__(self, tls_cfg, base_dir=""):
        self.tls_cfg = tls_cfg
        self.base_dir = base_dir
        self._ctx = None

    def load(self):
        if self._ctx is None:
            self._ctx = from_config(self.tls_cfg, self.base_dir)
        return self._ctx

    def wrap_socket(self, sock, server_hostname=None):
        return self.load().wrap_socket(sock, server_hostname=server_hostname)
