"""Test certificates made at test time: a CA, a server certificate for localhost and
127.0.0.1, and a client certificate (for mutual TLS), as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


def write_test_certs(folder: Path) -> dict[str, Path]:
    """Write ca.pem, server.pem/.key and client.pem/.key into `folder`; return their paths."""
    ca_key = _key()
    ca = _cert("meg-test-ca", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    return {
        "ca": _write(folder / "ca.pem", ca),
        "server_cert": _write(folder / "server.pem", _cert("localhost", server_key, ca, ca_key)),
        "server_key": _write(folder / "server.key", key=server_key),
        "client_cert": _write(folder / "client.pem", _cert("device", client_key, ca, ca_key)),
        "client_key": _write(folder / "client.key", key=client_key),
    }
