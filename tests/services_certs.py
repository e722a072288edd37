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
          *, ca: bool = False, hosts: tuple[str, ...] = ("localhost",), expired: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC) - (datetime.timedelta(days=2) if expired else datetime.timedelta(0))
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
            x509.SubjectAlternativeName([*(x509.DNSName(h) for h in hosts),
                                         *([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if "localhost" in hosts else [])]),
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
    _write(folder / "ca.key", key=ca_key)
    return {
        "ca": _write(folder / "ca.pem", ca),
        "server_cert": _write(folder / "server.pem", _cert("localhost", server_key, ca, ca_key)),
        "server_key": _write(folder / "server.key", key=server_key),
        "client_cert": _write(folder / "client.pem", _cert("device", client_key, ca, ca_key)),
        "client_key": _write(folder / "client.key", key=client_key),
    }


def write_bad_certs(folder: Path, good: dict[str, Path]) -> dict[str, Path]:
    """Certificates a TLS peer must refuse, next to `good` (from `write_test_certs` in the
    same folder): another CA, an expired server and client certificate from the good CA, and
    a server certificate for another host name."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = x509.load_pem_x509_certificate(good["ca"].read_bytes())
    ca_key = load_pem_private_key((folder / "ca.key").read_bytes(), None)
    other_key = _key()
    other_ca = _cert("other-ca", other_key, None, other_key, ca=True)
    expired_key, wrong_key, client_key, foreign_key = _key(), _key(), _key(), _key()
    return {
        "other_ca": _write(folder / "other-ca.pem", other_ca),
        "expired_cert": _write(folder / "expired.pem", _cert("localhost", expired_key, ca, ca_key, expired=True)),  # type: ignore[arg-type]
        "expired_key": _write(folder / "expired.key", key=expired_key),
        "wrong_host_cert": _write(folder / "wrong-host.pem", _cert("edge.example", wrong_key, ca, ca_key, hosts=("edge.example",))),  # type: ignore[arg-type]
        "wrong_host_key": _write(folder / "wrong-host.key", key=wrong_key),
        "expired_client_cert": _write(folder / "expired-client.pem", _cert("device", client_key, ca, ca_key, expired=True)),  # type: ignore[arg-type]
        "expired_client_key": _write(folder / "expired-client.key", key=client_key),
        "foreign_client_cert": _write(folder / "foreign-client.pem", _cert("device", foreign_key, other_ca, other_key)),
        "foreign_client_key": _write(folder / "foreign-client.key", key=foreign_key),
    }
