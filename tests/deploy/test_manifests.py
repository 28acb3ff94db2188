"""deploy/ is checked, not just written: Kubernetes schemas, systemd's own verifier, the
Greengrass recipe and the Dockerfile against the commands and ports the node really has."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

import mesh
from mesh.cli import main as mesh_cli
from mesh.identity import k8s
from mesh.node.config import load_config, parse_host_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K3S = DEPLOY / "k3s" / "fleetmesh.yaml"
KUBEEDGE = DEPLOY / "kubeedge" / "fleetmesh-edge.yaml"
UNIT = DEPLOY / "fleetmesh-node.service"
RECIPE = DEPLOY / "greengrass" / "recipes" / f"com.fleetmesh.Node-{mesh.__version__}.yaml"
# The newest Kubernetes schema kubernetes-validate ships (bundled: no network needed).
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def load_resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def daemonset(path: Path) -> dict:
    return next(r for r in load_resources(path) if r["kind"] == "DaemonSet")


def node_container(ds: dict) -> dict:
    return next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "node")


def validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


# -- Kubernetes ---------------------------------------------------------------------------


def test_schemas_are_a_current_kubernetes():
    major, minor = (int(x) for x in KUBERNETES_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33), \
        f"kubernetes-validate's newest schema is {KUBERNETES_VERSION}; upgrade it"


@pytest.mark.parametrize("path", [K3S, KUBEEDGE], ids=["k3s", "kubeedge"])
def test_manifests_pass_kubernetes_validate_strict(path):
    resources = load_resources(path)
    assert resources
    for resource in resources:
        validate(resource)


def test_the_validator_catches_a_broken_daemonset():
    """The check above is only worth something if it fails on a mistake."""
    broken = copy.deepcopy(daemonset(K3S))
    node_container(broken)["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = copy.deepcopy(daemonset(K3S))
    broken["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_the_rendered_secret_passes_kubernetes_validate(fleet):
    from mesh.identity.ca import enroll

    secret = k8s.node_secret_manifest(enroll(fleet.directory, "edge-03", force=True).directory)
    validate(secret)


@pytest.mark.parametrize("path", [K3S, KUBEEDGE], ids=["k3s", "kubeedge"])
def test_probes_use_the_probe_servers_paths_on_the_metrics_port(path):
    ds = daemonset(path)
    node = node_container(ds)
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    example = load_config(DEPLOY / "node.toml")
    assert ports["metrics"] == parse_host_port(example.metrics_listen)[1]
    assert ports["grpc"] == parse_host_port(example.listen)[1]
    assert node["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert node["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    # Liveness must not restart a node faster than /healthz calls its loop stalled (10 s).
    live = node["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > 10
    assert node["readinessProbe"]["timeoutSeconds"] > 2, "/readyz waits up to 2 s for the loop"
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True


def test_kubeedge_variant_lands_only_on_edge_nodes_and_k3s_only_off_them():
    edge = daemonset(KUBEEDGE)["spec"]["template"]["spec"]
    assert edge["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
    tolerated = {(t["key"], t["effect"]) for t in edge["tolerations"]}
    assert {("node-role.kubernetes.io/edge", "NoSchedule"), ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/not-ready", "NoExecute")} <= tolerated
    assert all("tolerationSeconds" not in t for t in edge["tolerations"]), \
        "an offline edge node keeps its pod"
    assert edge["automountServiceAccountToken"] is False
    k3s = daemonset(K3S)["spec"]["template"]["spec"]
    required = k3s["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    assert {"key": "node-role.kubernetes.io/edge", "operator": "DoesNotExist"} in terms[0]["matchExpressions"]


def test_k3s_init_step_is_the_select_cert_command_and_only_it_holds_a_token():
    spec = daemonset(K3S)["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    select = next(c for c in spec["initContainers"] if c["name"] == "select-cert")
    command = [a.replace("$(NODE_NAME)", "edge-01") for a in select["command"]]
    assert command[:3] == ["python", "-m", "mesh.identity.k8s"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in select["env"]}
    assert env["NODE_NAME"] == "spec.nodeName"
    # Its arguments parse (argparse exits 2 on a usage error).
    done = subprocess.run([sys.executable, *command[1:], "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = command[command.index("--out") + 1]
    mounts = {m["name"]: m for m in select["volumeMounts"]}
    assert mounts["creds"]["mountPath"] == out
    assert mounts["api-token"]["mountPath"] == str(k8s.SERVICE_ACCOUNT_DIR)
    node_mounts = {m["name"]: m for m in node_container(daemonset(K3S))["volumeMounts"]}
    assert "api-token" not in node_mounts
    assert node_mounts["creds"]["readOnly"] is True
    assert node_mounts["creds"]["mountPath"] == str(load_config(DEPLOY / "node.toml").tls.dir)
    creds = next(v for v in spec["volumes"] if v["name"] == "creds")
    assert creds["emptyDir"]["medium"] == "Memory"
    # The Role lets the pod get a Secret, nothing more.
    role = next(r for r in load_resources(K3S) if r["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


@pytest.mark.parametrize("path", [K3S, KUBEEDGE], ids=["k3s", "kubeedge"])
def test_start_script_writes_a_config_the_node_accepts(path, tmp_path):
    """Run the node container's own script, with `mesh` replaced by a stand-in that
    only shows the config it was given."""
    node = node_container(daemonset(path))
    assert node["command"] == ["/bin/sh", "-c"]
    (tmp_path / "config").mkdir()
    shutil.copy(DEPLOY / "node.toml", tmp_path / "config" / "node.toml")
    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / "mesh"
    stand_in.write_text('#!/bin/sh\n[ "$1 $2" = "node --config" ] && cp "$3" "$OUT"\n')
    stand_in.chmod(0o755)
    script = re.sub(r"/(config|tmp)/", lambda m: f"{tmp_path}/{m.group(1)}/", node["args"][0])
    (tmp_path / "tmp").mkdir()
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "NODE_NAME": "edge-07", "POD_IP": "192.0.2.7",
           "OUT": str(tmp_path / "seen.toml")}
    done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    config = load_config(tmp_path / "seen.toml")
    assert config.node_id == "edge-07"
    assert config.advertise == "192.0.2.7:7000"


def test_the_image_user_is_the_pods_user():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user, "the image must run as a numeric non-root user"
    for path in (K3S, KUBEEDGE):
        context = daemonset(path)["spec"]["template"]["spec"]["securityContext"]
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user.groups()
        assert context["runAsNonRoot"] is True


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_installs_the_wheel_that_python_m_build_makes():
    """No daemon or base image can be had here to build it; check it against the repository."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2
    build, runtime = stages
    assert re.search(r"^RUN python -m build --wheel --outdir /dist$", build, re.M)
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", build, re.M):
        for name in source.split():
            assert (REPO / name).exists(), f"Dockerfile copies {name}, which the repository does not have"
    assert "COPY --from=build /dist/" in runtime
    assert re.search(r"pip install --no-cache-dir /tmp/dist/fleetmesh-\*\.whl", runtime)
    assert re.search(r'^ENTRYPOINT \["mesh", "node"\]$', runtime, re.M)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", runtime, re.M).group(1).split()}
    example = load_config(DEPLOY / "node.toml")
    assert exposed == {parse_host_port(example.listen)[1], parse_host_port(example.metrics_listen)[1]}
    assert f":{parse_host_port(example.metrics_listen)[1]}/healthz" in runtime


# -- systemd --------------------------------------------------------------------------------


def systemd_verify(unit_text: str, root: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` in a root of its own: the host's unit library, the unit, and an
    executable where ExecStart points (the real one is installed on devices, not here)."""
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
    exec_start = re.search(r"^ExecStart=(\S+)", unit_text, re.M).group(1)
    target = root / exec_start.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\nexit 0\n")
    target.chmod(0o755)
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", f"--root={root}",
                           f"/etc/systemd/system/{UNIT.name}"], capture_output=True, text=True, timeout=60)


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None
                                   or not Path("/usr/lib/systemd/system").is_dir(),
                                   reason="systemd-analyze is not installed (apt-get install systemd)")


@needs_systemd
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    done = systemd_verify(UNIT.read_text(), tmp_path)
    # verify exits 0 on some warnings (an unknown key), so any output is a failure too.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@needs_systemd
@pytest.mark.parametrize("mistake", [("Type=notify", "Type=notifyy"), ("WatchdogSec=30", "WatchdogSecs=30"),
                                     ("ExecStart=/opt", "ExecStart=opt")])
def test_systemd_verify_catches_a_broken_unit(tmp_path, mistake):
    text = UNIT.read_text()
    assert "\n" + mistake[0] in text
    done = systemd_verify(text.replace("\n" + mistake[0], "\n" + mistake[1], 1), tmp_path)
    assert done.returncode != 0 or done.stdout + done.stderr


def test_systemd_unit_runs_the_node_command_with_notify():
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    argv = shlex.split(re.search(r"^ExecStart=(.+)$", text, re.M).group(1))
    assert_names_mesh_command(argv)
    assert re.search(r"^RestartPreventExitStatus=2$", text, re.M), "exit 2 is a config error: no restart loop"


# -- Greengrass -----------------------------------------------------------------------------

RECIPE_VARIABLES = re.compile(r"\{(configuration:/[A-Za-z0-9/]+|work:path|artifacts:path|"
                              r"artifacts:decompressedPath|kernel:rootPath|iot:thingName)\}")


def assert_names_mesh_command(argv: list[str]) -> None:
    """argv runs a `mesh` subcommand that exists, with options it has."""
    program, *rest = argv
    assert Path(program).name == "mesh", f"{program} is not the mesh entry point"
    command: click.Command = mesh_cli
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`mesh ... {rest[0]}` is not a command"
        command, rest = sub, rest[1:]
    assert not isinstance(command, click.Group), f"{argv} names a command group, not a command"
    options = {opt for param in command.params for opt in param.opts}
    for token in rest:
        if token.startswith("-"):
            assert token.split("=")[0] in options, f"`{token}` is not an option of {command.name}"


def recipe_run_argv(recipe: dict) -> list[str]:
    lifecycle = recipe["Manifests"][0]["Lifecycle"]
    run = lifecycle["Run"]
    script = run["Script"] if isinstance(run, dict) else run
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    for name in re.findall(r"\{configuration:/(\w+)\}", script):
        assert name in defaults, f"Run uses configuration {name}, which has no default"
    assert RECIPE_VARIABLES.sub("X", script).count("{") == 0, f"unknown recipe variable in {script!r}"
    argv = shlex.split(RECIPE_VARIABLES.sub(lambda m: "/x" if "path" in m.group(1) else "x", script))
    assert argv[0] == "exec", "Run must exec the node so Greengrass stops the node itself"
    return argv[1:]


def test_greengrass_recipe_parses_and_runs_an_existing_command():
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert recipe["ComponentName"] == "com.fleetmesh.Node"
    assert recipe["ComponentVersion"] == mesh.__version__
    assert RECIPE.name == f"{recipe['ComponentName']}-{recipe['ComponentVersion']}.yaml"
    for manifest in recipe["Manifests"]:
        assert manifest["Platform"]["os"] == "linux"
        assert set(manifest["Lifecycle"]) <= {"Setenv", "Bootstrap", "Install", "Startup", "Run",
                                              "Shutdown", "Recover"}
    assert_names_mesh_command(recipe_run_argv(recipe))


def test_greengrass_install_uses_the_artifact_wheel():
    recipe = yaml.safe_load(RECIPE.read_text())
    manifest = recipe["Manifests"][0]
    wheel = f"fleetmesh-{mesh.__version__}-py3-none-any.whl"
    assert [Path(a["URI"]).name for a in manifest["Artifacts"]] == [wheel]
    assert f"{{artifacts:path}}/{wheel}" in manifest["Lifecycle"]["Install"]["Script"]
    assert "{work:path}/venv/bin/mesh" in manifest["Lifecycle"]["Run"]["Script"]


@pytest.mark.parametrize("script", [
    "exec {work:path}/venv/bin/mesh nodes --config {configuration:/ConfigPath}",
    "exec {work:path}/venv/bin/mesh node --conf {configuration:/ConfigPath}",
    "exec {work:path}/venv/bin/mesh node --config {configuration:/Missing}",
    "{work:path}/venv/bin/mesh node --config {configuration:/ConfigPath}",
])
def test_the_recipe_check_catches_a_wrong_run_command(script):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["Manifests"][0]["Lifecycle"]["Run"]["Script"] = script
    with pytest.raises(AssertionError):
        assert_names_mesh_command(recipe_run_argv(recipe))


def test_readme_lists_the_files_that_exist_and_covers_each_platform():
    readme = (DEPLOY / "README.md").read_text()
    files_table = readme.split("| file | what it is |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", files_table, re.M)
    assert listed
    for name in listed:
        assert (DEPLOY / name).exists(), f"deploy/README.md lists {name}, which does not exist"
    for heading in ("## 1. The fleet", "## 2. K3s", "## 3. KubeEdge", "## 4. AWS IoT Greengrass",
                    "## 5. A plain systemd device", "## Probes", "## Monitoring"):
        assert heading in readme
    assert "mesh fleet init" in readme
