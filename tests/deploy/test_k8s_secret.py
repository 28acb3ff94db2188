"""Per-device Secrets: rendered from an enrolled folder, fetched back by the DaemonSet's init step.

The init step runs as it does in a pod (`python -m mesh.identity.k8s select-cert`, in-cluster
environment variables, a service-account folder) against a local HTTPS server that answers
like the API server's GET of a Secret.
"""

from __future__ import annotations

import base64
import copy
import datetime
import http.server
import ipaddress
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from mesh.identity.ca import enroll, load_credentials
from mesh.identity.k8s import (
    NODE_FILES,
    K8sCredentialsError,
    K8sNameError,
    credentials_from_secret,
    node_secret,
    node_secret_manifest,
    secret_name,
)

TOKEN = "test-service-account-token"


@pytest.fixture(scope="module")
def node_dir(fleet) -> Path:
    return enroll(fleet.directory, "edge-01", force=True).directory


def test_secret_holds_every_file_of_the_enrolled_folder(node_dir):
    secret = node_secret_manifest(node_dir, namespace="fleet-a")
    assert secret["apiVersion"] == "v1" and secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert secret["metadata"]["name"] == "fleetmesh-cert-edge-01"
    assert secret["metadata"]["namespace"] == "fleet-a"
    assert secret["metadata"]["labels"]["fleetmesh.io/node"] == "edge-01"
    assert set(secret["data"]) == set(NODE_FILES) == {p.name for p in node_dir.iterdir()}
    for name, encoded in secret["data"].items():
        assert base64.b64decode(encoded) == (node_dir / name).read_bytes()
    annotations = secret["metadata"]["annotations"]
    not_after = datetime.datetime.fromisoformat(annotations["fleetmesh.io/cert-not-after"])
    assert not_after == load_cert(node_dir / "cert.pem").not_valid_after_utc
    json.dumps(secret)  # kubectl apply -f - takes it as JSON


def test_the_name_comes_from_the_certificate_not_the_folder(node_dir, tmp_path):
    renamed = tmp_path / "whatever"
    renamed.mkdir()
    for f in node_dir.iterdir():
        (renamed / f.name).write_bytes(f.read_bytes())
    assert node_secret_manifest(renamed)["metadata"]["name"] == "fleetmesh-cert-edge-01"


def test_secret_round_trips_to_the_same_files(node_dir):
    files = credentials_from_secret(node_secret_manifest(node_dir), "edge-01")
    assert files == {name: (node_dir / name).read_bytes() for name in NODE_FILES}


def test_an_incomplete_folder_names_the_missing_file(node_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in node_dir.iterdir():
        if f.name != "operator.pub":
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(K8sCredentialsError,
                       match=r"operator\.pub is missing; .* `mesh fleet enroll <node> --force`"):
        node_secret_manifest(partial)


def test_an_operator_folder_is_refused(fleet):
    with pytest.raises(K8sCredentialsError, match="not a fleetmesh node certificate"):
        node_secret_manifest(fleet.directory / "operators" / "admin")


def test_a_node_name_kubernetes_refuses_is_named(fleet):
    creds = enroll(fleet.directory, "Cam_01", force=True)
    with pytest.raises(K8sNameError, match=r"'Cam_01' is not a Kubernetes node name"):
        node_secret_manifest(creds.directory)


def test_a_secret_holding_another_nodes_certificate_is_refused(node_dir):
    secret = node_secret_manifest(node_dir)
    with pytest.raises(K8sCredentialsError, match=r"holds the certificate of node 'edge-01', not 'edge-02'"):
        credentials_from_secret(secret, "edge-02")
    broken = copy.deepcopy(secret)
    broken["data"]["key.pem"] = "not base64!"
    with pytest.raises(K8sCredentialsError, match="key key.pem is not base64"):
        credentials_from_secret(broken, "edge-01")
    del broken["data"]["key.pem"]
    with pytest.raises(K8sCredentialsError, match="has no key key.pem"):
        credentials_from_secret(broken, "edge-01")


def test_node_secret_refuses_missing_or_foreign_files(node_dir):
    files = {name: (node_dir / name).read_bytes() for name in NODE_FILES}
    with pytest.raises(K8sCredentialsError, match="lack ca.pem"):
        node_secret("edge-01", {k: v for k, v in files.items() if k != "ca.pem"})
    with pytest.raises(K8sCredentialsError, match="unexpected files"):
        node_secret("edge-01", {**files, "notes.txt": b"x"})
    with pytest.raises(K8sCredentialsError, match="is node 'edge-01'"):
        node_secret("edge-02", files)


_DNS_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@given(st.lists(_DNS_LABEL, min_size=1, max_size=3).map(".".join))
def test_every_kubernetes_node_name_names_a_secret(name):
    if len(name) <= 63:
        assert secret_name(name) == "fleetmesh-cert-" + name


@given(st.text(max_size=70))
def test_secret_name_accepts_only_dns_subdomains(name):
    import re

    valid = len(name) <= 63 and re.fullmatch(
        r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", name) is not None
    try:
        secret_name(name)
        accepted = True
    except K8sNameError:
        accepted = False
    assert accepted == valid


# -- the init step against an HTTPS server answering like the API server ---------------------------


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _self_signed_localhost(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ApiServer:
    """Answers GET /api/v1/namespaces/<ns>/secrets/<name> from `secrets`, as the API server does."""

    def __init__(self, directory: Path) -> None:
        self.secrets: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str | None]] = []
        cert_path, key_path = _self_signed_localhost(directory)
        self.ca_path = cert_path
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                api.requests.append((self.path, self.headers.get("Authorization")))
                parts = self.path.strip("/").split("/")
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._answer(403, {"kind": "Status", "reason": "Forbidden"})
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    secret = api.secrets.get((parts[3], parts[5]))
                    if secret is not None:
                        return self._answer(200, secret)
                return self._answer(404, {"kind": "Status", "reason": "NotFound"})

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def api(tmp_path):
    server = ApiServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def service_account(tmp_path, api) -> Path:
    """The projected api-token volume as the kubelet lays it out."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "ca.crt").write_bytes(api.ca_path.read_bytes())
    (sa / "namespace").write_text("fleetmesh")
    return sa


def run_select_cert(api: ApiServer, service_account: Path, node: str, out: Path, **env: str):
    environ = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port),
               "POD_NAMESPACE": "fleetmesh", **env}
    return subprocess.run([sys.executable, "-m", "mesh.identity.k8s", "select-cert", "--node", node, "--out",
                           str(out), "--service-account-dir", str(service_account)],
                          env=environ, capture_output=True, text=True, timeout=60)


def test_init_step_writes_the_nodes_own_credentials(api, service_account, node_dir, fleet, tmp_path):
    api.secrets[("fleetmesh", "fleetmesh-cert-edge-01")] = node_secret_manifest(node_dir)
    other = enroll(fleet.directory, "edge-02", force=True).directory
    api.secrets[("fleetmesh", "fleetmesh-cert-edge-02")] = node_secret_manifest(other)
    out = tmp_path / "creds"
    done = run_select_cert(api, service_account, "edge-01", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == \
        f"wrote the credentials of node edge-01 (Secret fleetmesh-cert-edge-01) into {out}"
    assert api.requests == [("/api/v1/namespaces/fleetmesh/secrets/fleetmesh-cert-edge-01",
                             f"Bearer {TOKEN}")]
    for name, mode in NODE_FILES.items():
        assert (out / name).read_bytes() == (node_dir / name).read_bytes()
        assert stat.S_IMODE((out / name).stat().st_mode) == mode
    creds = load_credentials(out)
    assert (creds.name, creds.role.value) == ("edge-01", "node")


def test_init_step_without_its_secret_says_how_to_create_it(api, service_account, tmp_path):
    done = run_select_cert(api, service_account, "edge-07", tmp_path / "creds")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: no Secret fleetmesh-cert-edge-07 in namespace fleetmesh; on the operator's machine run "
        "`mesh fleet enroll edge-07 --k8s-secret | kubectl apply -f -` (this pod retries by itself)")
    assert not (tmp_path / "creds").exists()


def test_init_step_refused_by_rbac_names_the_manifest(api, service_account, tmp_path):
    (service_account / "token").write_text("someone-else")
    done = run_select_cert(api, service_account, "edge-01", tmp_path / "creds")
    assert done.returncode == 1
    assert "refused to give Secret fleetmesh-cert-edge-01 in namespace fleetmesh (HTTP 403)" in done.stderr
    assert "deploy/k3s/fleetmesh.yaml" in done.stderr


def test_init_step_outside_a_pod_is_one_line(tmp_path, service_account):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    done = subprocess.run([sys.executable, "-m", "mesh.identity.k8s", "select-cert", "--node", "edge-01",
                           "--out", str(tmp_path / "c"), "--service-account-dir", str(service_account)],
                          env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: KUBERNETES_SERVICE_HOST/PORT are not set: select-cert runs inside a pod (or pass --api-url)"]


def test_init_step_does_not_trust_an_unknown_api_certificate(api, service_account, node_dir, tmp_path):
    api.secrets[("fleetmesh", "fleetmesh-cert-edge-01")] = node_secret_manifest(node_dir)
    (tmp_path / "other").mkdir()
    other_ca, _ = _self_signed_localhost(tmp_path / "other")  # a CA the API server's cert is not from
    (service_account / "ca.crt").write_bytes(other_ca.read_bytes())
    done = run_select_cert(api, service_account, "edge-01", tmp_path / "creds")
    assert done.returncode == 1
    assert "cannot reach the Kubernetes API at https://127.0.0.1:" in done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr
    assert api.requests == []


def test_init_step_usage_error_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mesh.identity.k8s", "select-cert", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--node" in done.stderr
