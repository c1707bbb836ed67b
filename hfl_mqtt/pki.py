"""Secrets of a fleet: broker passwords (mosquitto_passwd format), a private CA, certificates.

Passwords::

    line = password_line("edge-0", new_password())      # edge-0:$7$101$<salt>$<hash>
    check_password(parse_password_file(text)["edge-0"], password)

Mosquitto 2.0 stores ``user:$7$ITERATIONS$SALT$HASH``: PBKDF2-HMAC-SHA512 over the password
with a 12-byte salt, 101 iterations, a 64-byte hash, salt and hash in padded base64 (what
``mosquitto_passwd`` writes; the broker reads any iteration count). This needs only hashlib.

Certificates (the ``cryptography`` package, ``pip install 'hfl-mqtt[plan]'``): ``new_ca`` makes a
private CA, ``issue`` a server certificate (with the host names and addresses clients connect
to) or a client certificate (its common name is the node id). Keys are EC P-256, certificates
SHA-256; everything is PEM bytes, ready to write to files.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hfl_mqtt.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

__all__ = [
    "KeyPair",
    "check_password",
    "issue",
    "new_ca",
    "new_password",
    "parse_password_file",
    "password_hash",
    "password_line",
]

_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
_SALT_BYTES = 12
_HASH_NAME = "sha512"
_SHA512_ID = "7"
_PASSWORD_BYTES = 24


def new_password() -> str:
    """A random password (32 URL-safe characters: no spaces, fine in mosquitto.conf)."""
    return secrets.token_urlsafe(_PASSWORD_BYTES)


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """``$7$101$<salt>$<hash>``: the part of a password file line after ``user:``."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac(_HASH_NAME, password.encode(), salt, _PBKDF2_ITERATIONS)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"${_SHA512_ID}${_PBKDF2_ITERATIONS}${'$'.join(encoded)}"


def password_line(user: str, password: str) -> str:
    """One line of a Mosquitto password file (without the newline)."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"user {user!r}: a password file user has no ':' and no spaces")
    return f"{user}:{password_hash(password)}"


def parse_password_file(text: str) -> dict[str, str]:
    """Users and their hashes; ``ValueError`` on a line that is not ``user:hash``."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ValueError(f"line {number}: not user:hash")
        if user in users:
            raise ValueError(f"line {number}: user {user!r} appears twice")
        users[user] = hashed
    return users


def check_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches ``hashed`` (a ``$7$`` PBKDF2-SHA512 hash)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != _SHA512_ID or not parts[2].isdigit():
        raise ValueError("not a $7$ (PBKDF2-SHA512) password hash")
    salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    digest = hashlib.pbkdf2_hmac(_HASH_NAME, password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate and its private key, both PEM (the key unencrypted: keep its file 0600)."""

    cert_pem: bytes
    key_pem: bytes


_CA_DAYS = 3650
_LEAF_DAYS = 825


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            "TLS certificates need the cryptography package: pip install 'hfl-mqtt[plan]'"
        ) from None


def _new_key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        encipher_only=False,
        decipher_only=False,
    )


def new_ca(name: str, *, days: int = _CA_DAYS) -> KeyPair:
    """A self-signed CA certificate (``CN=name``) that may sign leaf certificates only."""
    _require_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: KeyPair,
    name: str,
    *,
    usage: Literal["server", "client"],
    hosts: tuple[str, ...] = (),
    days: int = _LEAF_DAYS,
) -> KeyPair:
    """A certificate for ``name`` (its common name) signed by ``ca``: a server's, whose subject
    alternative names are ``hosts`` (IP addresses as such), or a client's."""
    _require_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key (as hfl_mqtt.pki.new_ca makes)")
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    purpose = (
        ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        names = [_general_name(host) for host in dict.fromkeys(hosts)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(host: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
