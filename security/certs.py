"""The cluster's certificate authority: a CA, and certificates for nodes, executors, the CLI and the
MCP bridge, for mTLS on every gRPC channel (issue 6). ECDSA P-256 keys, SANs for localhost,
127.0.0.1 and any given hosts, a role in each certificate, files written atomically with private
keys 0600.

    <certs dir>/ca.pem, ca.key                    the cluster CA (ca.key never leaves this dir)
    <certs dir>/<name>.pem, <name>.key            one leaf per identity: node n1, executor w1, cli, bridge

The role is the certificate's OU (node | executor | cli | bridge): a node accepts peers' forwarded
calls only from `node` certificates, and RBAC (later in issue 6) starts from it. Nodes get both
server and client auth (they serve the API and forward to the leader); the others client auth only.

Nodes serve these with client certificates required (cluster/auth.py ServerTls) and re-read their
files when they change, so re-issuing a node's certificate rotates it without a restart; callers
present theirs through cluster/credentials.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("node", "executor", "cli", "bridge")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HOSTS_MAX = 32


class CertError(Exception):
    """A bad request (name, role, host, lifetime) or a certificate that does not verify."""


@dataclass(frozen=True)
class CertSettings:
    ca_lifetime_days: int = 3650
    leaf_lifetime_days: int = 90        # short enough that rotation is routine
    clock_skew_s: int = 300             # not_before is backdated this much

    def __post_init__(self) -> None:
        for name, high in (("ca_lifetime_days", 36500), ("leaf_lifetime_days", 3650), ("clock_skew_s", 86400)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise CertError(f"CertSettings.{name}: an int in 1..{high}, got {value!r}")


@dataclass(frozen=True)
class IssuedCert:
    name: str
    role: str
    cert_path: Path
    key_path: Path
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(certs_dir: str | Path, *, settings: CertSettings | None = None, cluster_name: str = "agent-coordinator"
            ) -> Path:
    """Create the CA in `certs_dir` (refuses to overwrite one); returns the path of ca.pem."""
    settings = settings or CertSettings()
    certs_dir = Path(certs_dir)
    certs_dir.mkdir(parents=True, exist_ok=True)
    if (certs_dir / "ca.key").exists():
        raise CertError(f"{certs_dir / 'ca.key'} exists: a cluster has one CA (remove the directory to start over)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=settings.clock_skew_s))
            .not_valid_after(now + datetime.timedelta(days=settings.ca_lifetime_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(certs_dir / "ca.key", _key_pem(key), private=True)
    _write(certs_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return certs_dir / "ca.pem"


def _load_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((certs_dir / "ca.key").read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"{certs_dir}: no CA here (run `coordctl certs init` first)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{certs_dir / 'ca.key'}: not an ECDSA key")
    return cert, key


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return x509.SubjectAlternativeName(names)


def issue(certs_dir: str | Path, name: str, role: str, *, hosts: list[str] | None = None,
          settings: CertSettings | None = None) -> IssuedCert:
    """A new key and certificate for `name` signed by the CA in `certs_dir` (replacing any older
    one of that name: rotation)."""
    settings = settings or CertSettings()
    certs_dir = Path(certs_dir)
    hosts = list(hosts or [])
    if not NAME_RE.match(name or "") or name == "ca":
        raise CertError(f"name: 1..64 chars of [A-Za-z0-9_.-], not 'ca', got {name!r}")
    if role not in ROLES:
        raise CertError(f"role: one of {', '.join(ROLES)}, got {role!r}")
    if len(hosts) > HOSTS_MAX:
        raise CertError(f"hosts: at most {HOSTS_MAX} (HOSTS_MAX), got {len(hosts)}")
    for host in hosts:
        if not re.match(r"^[A-Za-z0-9.:-]{1,253}$", host):
            raise CertError(f"hosts: {host!r} is not a host name or IP address")
    ca_cert, ca_key = _load_ca(certs_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=settings.leaf_lifetime_days), ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role == "node" else [])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=settings.clock_skew_s)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = certs_dir / f"{name}.key", certs_dir / f"{name}.pem"
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return IssuedCert(name, role, cert_path, key_path, not_after)


def init_cluster(certs_dir: str | Path, node_ids: list[str], *, hosts: list[str] | None = None,
                 settings: CertSettings | None = None) -> list[IssuedCert]:
    """The CA plus a certificate for each node, the CLI and the MCP bridge."""
    init_ca(certs_dir, settings=settings)
    issued = [issue(certs_dir, node_id, "node", hosts=hosts, settings=settings) for node_id in node_ids]
    issued.append(issue(certs_dir, "cli", "cli", settings=settings))
    issued.append(issue(certs_dir, "bridge", "bridge", settings=settings))
    return issued


def verify(cert_pem: bytes, ca_pem: bytes, *, at: datetime.datetime | None = None) -> tuple[str, str]:
    """(name, role) of a certificate the CA signed and that is valid at `at` (default now);
    CertError naming what is wrong otherwise."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertError(f"certificate: not issued by this cluster's CA ({exc or type(exc).__name__})") from None
    at = at or _now()
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise CertError(f"certificate: valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}, "
                        f"not at {at:%Y-%m-%d %H:%M}")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not names or not roles or roles[0].value not in ROLES:
        raise CertError("certificate: no name or role (CN, OU)")
    return str(names[0].value), str(roles[0].value)
