"""The cluster CA: certificates for nodes, executors, the CLI and the bridge, and that they do
what mTLS needs — a real gRPC server requiring client certificates accepts one from this CA and
refuses a client without one or with one from another CA."""

from __future__ import annotations

import datetime
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from security.certs import CertError, CertSettings, init_ca, init_cluster, issue, verify


def test_init_cluster_writes_a_ca_and_a_certificate_per_identity(tmp_path) -> None:
    issued = init_cluster(tmp_path, ["n1", "n2", "n3"], hosts=["coord.example", "10.0.0.7"])
    assert [(c.name, c.role) for c in issued] == [("n1", "node"), ("n2", "node"), ("n3", "node"),
                                                  ("cli", "cli"), ("bridge", "bridge")]
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    for cert in issued:
        assert stat.S_IMODE(os.stat(cert.key_path).st_mode) == 0o600
        assert verify(cert.cert_path.read_bytes(), ca_pem) == (cert.name, cert.role)
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    node = x509.load_pem_x509_certificate((tmp_path / "n1.pem").read_bytes())
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coord.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.7"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    eku = set(node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cli = x509.load_pem_x509_certificate((tmp_path / "cli.pem").read_bytes())
    assert set(cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert node.not_valid_after_utc - node.not_valid_before_utc <= datetime.timedelta(days=91)


def test_bad_requests_name_the_field_and_a_second_ca_is_refused(tmp_path) -> None:
    init_ca(tmp_path)
    with pytest.raises(CertError, match="one CA"):
        init_ca(tmp_path)
    with pytest.raises(CertError, match="role: one of node, executor, cli, bridge"):
        issue(tmp_path, "w1", "root")
    with pytest.raises(CertError, match="name: 1..64 chars"):
        issue(tmp_path, "../evil", "executor")
    with pytest.raises(CertError, match="hosts: at most 32"):
        issue(tmp_path, "n1", "node", hosts=[f"h{i}" for i in range(33)])
    with pytest.raises(CertError, match="no CA here"):
        issue(tmp_path / "elsewhere", "w1", "executor")
    with pytest.raises(CertError, match="CertSettings.leaf_lifetime_days"):
        CertSettings(leaf_lifetime_days=0)


def test_verify_refuses_another_cas_certificate_and_an_expired_one(tmp_path) -> None:
    init_cluster(tmp_path / "a", ["n1"])
    init_cluster(tmp_path / "b", ["n1"])
    with pytest.raises(CertError, match="not issued by this cluster's CA"):
        verify((tmp_path / "b" / "n1.pem").read_bytes(), (tmp_path / "a" / "ca.pem").read_bytes())
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=120)
    with pytest.raises(CertError, match="valid"):
        verify((tmp_path / "a" / "n1.pem").read_bytes(), (tmp_path / "a" / "ca.pem").read_bytes(), at=later)
    rotated = issue(tmp_path / "a", "n1", "node")                    # rotation: a new key and certificate
    assert verify(rotated.cert_path.read_bytes(), (tmp_path / "a" / "ca.pem").read_bytes()) == ("n1", "node")


def test_a_real_grpc_server_accepts_only_clients_with_a_certificate_of_the_ca(tmp_path) -> None:
    init_cluster(tmp_path / "ours", ["n1"])
    init_cluster(tmp_path / "theirs", ["n1"])
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ca = (ours / "ca.pem").read_bytes()
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([((ours / "n1.key").read_bytes(), (ours / "n1.pem").read_bytes())],
                                              root_certificates=ca, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()

    def check(client_dir, name: str | None) -> grpc.StatusCode | None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(client_dir / f"{name}.key").read_bytes() if name else None,
            certificate_chain=(client_dir / f"{name}.pem").read_bytes() if name else None)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return None
            except grpc.RpcError as exc:
                return exc.code()

    try:
        assert check(ours, "cli") is None                             # our CA's client: served
        assert check(ours, None) == grpc.StatusCode.UNAVAILABLE        # no client certificate: refused
        assert check(theirs, "cli") == grpc.StatusCode.UNAVAILABLE     # another CA's: refused
    finally:
        server.stop(None)


def test_coordctl_certs_init_and_issue(tmp_path) -> None:
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def coordctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=60, cwd=root)

    made = coordctl("certs", "init", "--nodes", "n1,n2", "--host", "10.1.2.3", "--output", "json")
    assert made.returncode == 0, made.stderr
    assert [r["name"] for r in json.loads(made.stdout)["issued"]] == ["n1", "n2", "cli", "bridge"]
    worker = coordctl("certs", "issue", "--name", "w1", "--role", "executor", "--days", "7", "--output", "json")
    assert worker.returncode == 0, worker.stderr
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()
    assert verify((tmp_path / "certs" / "w1.pem").read_bytes(), ca) == ("w1", "executor")
    again = coordctl("certs", "init")
    assert again.returncode == 1 and "one CA" in again.stderr
    bad = coordctl("certs", "issue", "--name", "w2", "--role", "executor", "--days", "0")
    assert bad.returncode == 1 and "--days: an int in 1..3650" in bad.stderr
