"""Per-device credentials as Kubernetes Secrets, and the init step that picks a pod's own.

Kubernetes cannot template a Secret's name per pod, so one DaemonSet cannot mount
`fleetmesh-cert-<its node>` directly. Instead:

1. On the operator's machine, every enrolled node folder becomes one Secret,
   `fleetmesh-cert-<node>` (`node_secret_manifest`; `kubectl apply -f -` takes the JSON).
2. In each pod, an init container runs `python -m mesh.identity.k8s select-cert --node
   $(NODE_NAME) --out DIR`: it reads that one Secret through the API server with a
   short-lived service-account token mounted only into the init container, and writes
   the folder (cert.pem, key.pem 0600, ...) into a memory-backed emptyDir that the node
   container mounts read-only. A pod whose Secret does not exist yet fails its init step
   with a line saying how to create it; the kubelet retries, so applying the Secret later
   is enough.

The Secret's keys are the folder's file names; nothing else is added, so
`credentials_from_secret(node_secret(...))` gives back the same bytes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

from mesh.durable import write_file_atomic
from mesh.identity.ca import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    OPERATOR_PUB_FILE,
    PUBLISHER_PUB_FILE,
    Role,
    cert_identity,
)
from mesh.identity.signing import IdentityError

DEFAULT_NAMESPACE = "fleetmesh"
SECRET_PREFIX = "fleetmesh-cert-"
# Every file `mesh fleet enroll` writes for a node, and the mode it is written with.
NODE_FILES: dict[str, int] = {
    CERT_FILE: 0o644, KEY_FILE: 0o600, CA_FILE: 0o644,
    PUBLISHER_PUB_FILE: 0o644, OPERATOR_PUB_FILE: 0o644,
}
NODE_LABEL = "fleetmesh.io/node"
NOT_AFTER_ANNOTATION = "fleetmesh.io/cert-not-after"
# Kubernetes node names (and so Secret names) are DNS-1123 subdomains: lowercase.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class K8sCredentialsError(IdentityError):
    """A node's credentials cannot become, or be read back from, a Kubernetes Secret."""


class K8sNameError(K8sCredentialsError):
    """The node's name cannot name a Kubernetes node or Secret."""


class SecretNotFoundError(K8sCredentialsError):
    """The API server has no `fleetmesh-cert-<node>` Secret in the namespace."""


def secret_name(node_name: str) -> str:
    """`fleetmesh-cert-<node>`, refusing a name Kubernetes would refuse."""
    name = SECRET_PREFIX + node_name
    if len(node_name) > 63 or not _DNS_SUBDOMAIN.fullmatch(node_name):
        raise K8sNameError(
            f"node name {node_name!r} is not a Kubernetes node name (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 63 characters); enroll the device under "
            "its Kubernetes node name (`kubectl get nodes`)")
    return name


def node_secret(node_name: str, files: Mapping[str, bytes], namespace: str = DEFAULT_NAMESPACE) -> dict:
    """The Secret manifest holding one node's credential files (pure: bytes in, dict out)."""
    name = secret_name(node_name)
    missing = [f for f in NODE_FILES if f not in files]
    if missing:
        raise K8sCredentialsError(
            f"credentials of node {node_name!r} lack {', '.join(missing)}; re-issue them with "
            f"`mesh fleet enroll {node_name} --force`")
    unexpected = sorted(set(files) - set(NODE_FILES))
    if unexpected:
        raise K8sCredentialsError(f"credentials of node {node_name!r} hold unexpected files {unexpected}")
    cert = _node_certificate(node_name, files[CERT_FILE])
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "fleetmesh",
                       "app.kubernetes.io/component": "node-credentials", NODE_LABEL: node_name},
            "annotations": {NOT_AFTER_ANNOTATION: cert.not_valid_after_utc.isoformat()},
        },
        "data": {f: base64.b64encode(files[f]).decode() for f in NODE_FILES},
    }


def node_secret_manifest(node_dir: Path, namespace: str = DEFAULT_NAMESPACE) -> dict:
    """The Secret `fleetmesh-cert-<node>` for an enrolled node folder (`fleet/nodes/<node>`).

    The node's name comes from its certificate, not from the folder's name.
    """
    node_dir = Path(node_dir)
    files: dict[str, bytes] = {}
    for file_name in NODE_FILES:  # cert.pem first: an operator's folder is named as such
        try:
            files[file_name] = (node_dir / file_name).read_bytes()
        except FileNotFoundError:
            raise K8sCredentialsError(
                f"{node_dir / file_name} is missing; {node_dir} is not a complete enrolled node folder "
                "(re-issue it with `mesh fleet enroll <node> --force`)") from None
        except OSError as exc:
            raise K8sCredentialsError(f"cannot read {node_dir / file_name}: {exc.strerror}") from None
        if file_name == CERT_FILE:
            node_name = _certificate_name(files[CERT_FILE], node_dir / CERT_FILE)
    return node_secret(node_name, files, namespace)


def credentials_from_secret(secret: Mapping, node_name: str) -> dict[str, bytes]:
    """The credential files in a Secret as the API returns it, checked to be `node_name`'s."""
    where = f"Secret {SECRET_PREFIX}{node_name}"
    data = secret.get("data") or {}
    files: dict[str, bytes] = {}
    for file_name in NODE_FILES:
        if file_name not in data:
            raise K8sCredentialsError(
                f"{where} has no key {file_name}; recreate it with "
                f"`mesh fleet enroll {node_name} --k8s-secret`")
        try:
            files[file_name] = base64.b64decode(data[file_name], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise K8sCredentialsError(f"{where}: key {file_name} is not base64; recreate the Secret") \
                from None
    found = _certificate_name(files[CERT_FILE], f"{where} key {CERT_FILE}")
    if found != node_name:
        raise K8sCredentialsError(
            f"{where} holds the certificate of node {found!r}, not {node_name!r}; recreate it with "
            f"`mesh fleet enroll {node_name} --k8s-secret`")
    return files


def write_credentials(files: Mapping[str, bytes], out_dir: Path) -> None:
    """Write the credential files into `out_dir` with the modes `mesh fleet enroll` uses."""
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for file_name, mode in NODE_FILES.items():
        write_file_atomic(out_dir / file_name, files[file_name], mode)


def fetch_secret(api_url: str, namespace: str, name: str, *, token: str, ca_path: Path,
                 timeout_s: float = 10.0) -> dict:
    """GET one Secret from the Kubernetes API (in-cluster: a service-account token and CA)."""
    url = (f"{api_url.rstrip('/')}/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
           f"/secrets/{urllib.parse.quote(name, safe='')}")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}",
                                                   "Accept": "application/json"})
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as exc:
        raise K8sCredentialsError(f"cannot read the cluster CA {ca_path}: {exc}") from None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SecretNotFoundError(
                f"no Secret {name} in namespace {namespace}; on the operator's machine run "
                f"`mesh fleet enroll {name.removeprefix(SECRET_PREFIX)} --k8s-secret | kubectl apply -f -` "
                "(this pod retries by itself)") from None
        if exc.code in (401, 403):
            raise K8sCredentialsError(
                f"the API server refused to give Secret {name} in namespace {namespace} (HTTP {exc.code}); "
                "apply the ServiceAccount, Role and RoleBinding from deploy/k3s/fleetmesh.yaml") from None
        raise K8sCredentialsError(f"reading Secret {name} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise K8sCredentialsError(f"cannot reach the Kubernetes API at {api_url}: {reason}") from None
    except ValueError:
        raise K8sCredentialsError(f"the API server's answer for Secret {name} is not JSON") from None


def in_cluster_api_url(environ: Mapping[str, str]) -> str:
    """The API server's address as the kubelet hands it to every container."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise K8sCredentialsError("KUBERNETES_SERVICE_HOST/PORT are not set: select-cert runs inside a pod "
                                  "(or pass --api-url)")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def select_cert(node_name: str, out_dir: Path, *, namespace: str, api_url: str,
                service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> Path:
    """The init step: fetch `fleetmesh-cert-<node_name>` and write its files into `out_dir`."""
    name = secret_name(node_name)
    try:
        token = (service_account_dir / "token").read_text().strip()
    except OSError as exc:
        raise K8sCredentialsError(
            f"cannot read the service-account token {service_account_dir / 'token'}: {exc.strerror}; "
            "mount the projected api-token volume into the init container") from None
    secret = fetch_secret(api_url, namespace, name, token=token, ca_path=service_account_dir / "ca.crt")
    write_credentials(credentials_from_secret(secret, node_name), out_dir)
    return Path(out_dir)


def _node_certificate(node_name: str, cert_pem: bytes) -> x509.Certificate:
    found = _certificate_name(cert_pem, f"{CERT_FILE} of node {node_name!r}")
    if found != node_name:
        raise K8sCredentialsError(f"{CERT_FILE} given for node {node_name!r} is node {found!r}'s certificate")
    return x509.load_pem_x509_certificate(cert_pem)


def _certificate_name(cert_pem: bytes, where: object) -> str:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise K8sCredentialsError(f"{where} is not a PEM certificate") from None
    identity = cert_identity(cert)
    if identity is None or identity[1] is not Role.NODE:
        raise K8sCredentialsError(
            f"{where} is not a fleetmesh node certificate (`mesh fleet enroll` makes one)")
    return identity[0]


def main(argv: list[str] | None = None) -> int:
    """`python -m mesh.identity.k8s select-cert ...`: the DaemonSet's init step. Exit 0, 1 failed, 2 usage."""
    parser = argparse.ArgumentParser(prog="python -m mesh.identity.k8s",
                                     description="Kubernetes helpers for fleetmesh node credentials.")
    commands = parser.add_subparsers(dest="command", required=True)
    select = commands.add_parser("select-cert",
                                 help="write this node's Secret fleetmesh-cert-<node> into a folder")
    select.add_argument("--node", required=True,
                        help="Kubernetes node name (the downward API's spec.nodeName)")
    select.add_argument("--out", required=True, type=Path, help="folder to write cert.pem, key.pem, ... into")
    select.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", DEFAULT_NAMESPACE))
    select.add_argument("--api-url", default=None, help="default: from KUBERNETES_SERVICE_HOST/PORT")
    select.add_argument("--service-account-dir", type=Path, default=SERVICE_ACCOUNT_DIR)
    args = parser.parse_args(argv)
    try:
        api_url = args.api_url or in_cluster_api_url(os.environ)
        out = select_cert(args.node, args.out, namespace=args.namespace, api_url=api_url,
                          service_account_dir=args.service_account_dir)
    except K8sCredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote the credentials of node {args.node} (Secret {SECRET_PREFIX}{args.node}) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
