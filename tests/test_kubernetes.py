"""deploy/kubernetes, checked offline: every overlay renders with `kubectl
kustomize`, every rendered object validates against the Kubernetes schemas
(`kubernetes-validate`, strict: unknown fields are errors) and the vendored
RabbitmqCluster CRD, and the silo-side overlays keep their promises (no
inbound port, resource requests everywhere, secrets only referenced, the
`tff-amqp` command lines parse with the CLI's own parser).

No cluster runs here: these tests read manifests, nothing more.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tff_amqp import config
from tff_amqp.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
SILO_SIDE = ("silo-site", "silo-pool")
CRD = DEPLOY / "schemas" / "rabbitmq.com_rabbitmqclusters.yaml"
# The Kubernetes version of the schemas: that of the kubectl we render with.
KUBERNETES_VERSION = "1.32"
KUBECTL = "kubectl"
CREDENTIALS_IN_URL = re.compile(r"://[^/@\s:'\"]+:[^/@\s'\"]+@")


def kubectl() -> str:
    path = shutil.which(KUBECTL)
    if path is None:
        pytest.fail(
            "kubectl is not installed (needed to render deploy/kubernetes with "
            "`kubectl kustomize`): install kubectl >= 1.27 (e.g. apt-get install kubectl, "
            "or the static binary at /usr/bin/kubectl)",
            pytrace=False,
        )
    return path


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlays: tuple[str, ...] | list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay in overlays:
        for obj in render(overlay):
            yield overlay, obj


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field
    validation: an object with declared properties admits no others (unless
    it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def rabbitmqcluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "RabbitmqCluster"
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is checked by the API server, not by the CRD's schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def test_kubectl_is_installed():
    assert Path(kubectl()).exists()


def test_every_overlay_is_checked():
    assert set(OVERLAYS) == {"broker-operator", "broker-statefulset", "silo-site", "silo-pool"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    rendered = render(overlay)
    assert rendered, f"{overlay} rendered nothing"
    for obj in rendered:
        name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == "rabbitmq.com/v1beta1":
            errors = list(rabbitmqcluster_validator().iter_errors(obj))
            assert not errors, f"{name}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
            )
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")


def test_the_validation_catches_mistakes():
    """The two validators reject what a cluster would: a misspelt field in a
    built-in object and in the RabbitmqCluster."""
    (statefulset,) = (o for o in render("broker-statefulset") if o["kind"] == "StatefulSet")
    bad = copy.deepcopy(statefulset)
    bad["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    (cluster,) = (o for o in render("broker-operator") if o["kind"] == "RabbitmqCluster")
    bad = copy.deepcopy(cluster)
    bad["spec"]["tls"]["secretNmae"] = "x"
    assert list(rabbitmqcluster_validator().iter_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["replicas"] = "three"
    assert list(rabbitmqcluster_validator().iter_errors(bad))


def test_the_broker_has_three_nodes_tls_and_the_management_api():
    (cluster,) = (o for o in render("broker-operator") if o["kind"] == "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    assert cluster["spec"]["tls"]["secretName"] and cluster["spec"]["tls"]["caSecretName"]
    (statefulset,) = (o for o in render("broker-statefulset") if o["kind"] == "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    (conf,) = (
        o["data"]
        for o in render("broker-statefulset")
        if o["kind"] == "ConfigMap" and "rabbitmq.conf" in o["data"]
    )
    assert "rabbit_peer_discovery_k8s" in conf["rabbitmq.conf"]
    assert "listeners.ssl.default = 5671" in conf["rabbitmq.conf"]
    assert "rabbitmq_management" in conf["enabled_plugins"]
    # Both brokers offer what base/hub uses: Service tff-broker, the admin Secret.
    services = {
        o["metadata"]["name"]: {p["port"] for p in o["spec"]["ports"]}
        for o in render("broker-statefulset")
        if o["kind"] == "Service"
    }
    assert {5671, 15672} <= services["tff-broker"]


def test_no_service_of_a_silo_site_exposes_a_port():
    for overlay, obj in objects(SILO_SIDE):
        assert obj["kind"] not in ("Service", "Ingress"), f"{overlay} has a {obj['kind']}"
        spec = pod_spec(obj)
        for container in (spec or {}).get("containers", []):
            assert not container.get("ports"), f"{overlay}: {container['name']} declares ports"
            assert "hostPort" not in str(container)


def test_silo_side_pods_may_only_reach_the_broker_and_dns():
    for overlay in SILO_SIDE:
        rendered = render(overlay)
        policies = [o for o in rendered if o["kind"] == "NetworkPolicy"]
        pods = [o for o in rendered if pod_spec(o) is not None]
        assert policies and pods
        for pod in pods:
            labels = pod["spec"]["template"]["metadata"]["labels"]
            covering = [
                p
                for p in policies
                if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            ]
            assert covering, f"{overlay}: no NetworkPolicy selects {pod['metadata']['name']}"
            for policy in covering:
                assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                assert not policy["spec"].get("ingress"), "a silo admits no ingress"
                ports = {
                    (port["protocol"], port["port"])
                    for rule in policy["spec"]["egress"]
                    for port in rule["ports"]
                }
                assert ports == {("TCP", 5671), ("UDP", 53), ("TCP", 53)}


def test_every_container_has_resource_requests():
    for overlay, obj in objects(OVERLAYS):
        spec = pod_spec(obj)
        if spec is None:
            continue
        for container in spec.get("initContainers", []) + spec["containers"]:
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), (
                f"{overlay}: {obj['metadata']['name']}/{container['name']} has no requests"
            )
        if obj["kind"] == "RabbitmqCluster":
            assert obj["spec"]["resources"]["requests"]


def test_secrets_are_referenced_never_inlined():
    for overlay, obj in objects(OVERLAYS):
        assert obj["kind"] != "Secret", f"{overlay} defines Secret {obj['metadata']['name']}"
        spec = pod_spec(obj)
        for container in (spec or {}).get("containers", []):
            for var in container.get("env", []):
                if var["name"] in ("TFF_AMQP_BROKER", "ADMIN_PASS", "RABBITMQ_DEFAULT_PASS"):
                    assert "secretKeyRef" in var.get("valueFrom", {}), (
                        f"{overlay}: {var['name']} is not from a Secret"
                    )
        if obj["kind"] == "ConfigMap":
            # No URL with a password (scheme://user:password@host) in plain configuration.
            assert not CREDENTIALS_IN_URL.search(str(obj["data"])), (
                f"{overlay}: ConfigMap {obj['metadata']['name']} holds credentials"
            )


def silo_side_commands() -> Iterator[tuple[str, list[str], dict[str, str], dict[str, Any]]]:
    """(overlay, argv, environment, pod spec) of every silo-side container,
    the environment resolved from the rendered ConfigMaps and Secrets
    replaced by a placeholder URL."""
    for overlay in SILO_SIDE:
        rendered = render(overlay)
        maps = {o["metadata"]["name"]: o["data"] for o in rendered if o["kind"] == "ConfigMap"}
        for obj in rendered:
            spec = pod_spec(obj)
            if spec is None:
                continue
            for container in spec["containers"]:
                env = {}
                for var in container.get("env", []):
                    source = var.get("valueFrom", {})
                    if "configMapKeyRef" in source:
                        ref = source["configMapKeyRef"]
                        env[var["name"]] = maps[ref["name"]][ref["key"]]
                    elif "secretKeyRef" in source:
                        env[var["name"]] = "amqps://cn@broker.example:5671/?auth=external"
                    else:
                        env[var["name"]] = var["value"]
                yield overlay, container["args"], env, spec


def test_silo_side_command_lines_parse_and_use_what_is_mounted():
    for overlay, argv, env, spec in silo_side_commands():
        args = config.parse_args(build_parser(), argv, environ=env)
        assert args.no_declare, "provisioned silos may not declare"
        mounts = {
            m["mountPath"]: m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])
        }
        volumes = {v["name"]: v for v in spec["volumes"]}
        for path in (args.tls_ca, args.tls_cert, args.tls_key):
            assert str(path.parent) in mounts
            assert "secret" in volumes[mounts[str(path.parent)]]
        for flag in args.data:
            _, _, path = flag.partition("=")
            assert path in mounts, f"{overlay}: --data {path} is not mounted"
        if argv[0] == "silo":
            assert args.name in ("clinic_north", "clinic_south")
        else:
            assert args.stateless and args.silo == "clinic_west"
        assert args.federation == "fl"
    assert {argv[0] for _, argv, _, _ in silo_side_commands()} == {"silo", "worker"}


def test_each_silo_has_its_own_name_secrets_and_data():
    deployments = [o for o in render("silo-site") if o["kind"] == "Deployment"]
    assert len(deployments) == 2
    secrets = [
        {
            v["secret"]["secretName"]
            for v in d["spec"]["template"]["spec"]["volumes"]
            if "secret" in v
        }
        for d in deployments
    ]
    assert secrets[0].isdisjoint(secrets[1])
    names = {
        env["TFF_AMQP_NAME"] for _, _, env, _ in silo_side_commands() if "TFF_AMQP_NAME" in env
    }
    assert names == {"clinic_north", "clinic_south"}
    kinds = {
        next(k for k in ("persistentVolumeClaim", "configMap") if k in v)
        for d in deployments
        for v in d["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "data"
    }
    assert kinds == {"persistentVolumeClaim", "configMap"}
    for d in deployments:
        # Never two processes with one silo name, not even during an update.
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"


def test_the_pool_scales_on_its_work_queue():
    rendered = render("silo-pool")
    (hpa,) = (o for o in rendered if o["kind"] == "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    queue = metric["external"]["metric"]["selector"]["matchLabels"]["queue"]
    from tff_amqp.topology import Topology

    (pool,) = (o for o in rendered if o["kind"] == "ConfigMap" and "silo" in o["data"])
    topology = Topology(pool["data"]["federation"])
    assert queue == topology.work_queue(pool["data"]["silo"])


def test_the_provision_job_runs_real_provision_commands():
    for overlay in ("broker-operator", "broker-statefulset"):
        (job,) = (o for o in render(overlay) if o["metadata"]["name"] == "tff-provision")
        script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        commands = [
            shlex.split(line)
            for line in script.replace("\\\n", " ").splitlines()
            if line.strip().startswith("tff-amqp")
        ]
        assert [c[2] for c in commands] == ["add-coordinator", "add-silo"]
        parser = build_parser()
        for command in commands:
            args = parser.parse_args(command[1:])  # exits (SystemExit) on an unknown flag
            assert args.cert_cn, "certificate login: no password is printed to the Job's log"


def test_silo_side_probes_watch_the_heartbeats_of_their_own_process():
    """Every silo-side container is probed by `tff_amqp.observe.probe` on its
    own --metrics-port, for its role (tests/test_probe.py runs the probe)."""
    for overlay, argv, env, spec in silo_side_commands():
        args = config.parse_args(build_parser(), argv, environ=env)
        (container,) = spec["containers"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[kind]["exec"]["command"]
            assert command[:3] == ["python", "-m", "tff_amqp.observe.probe"], overlay
            probe = dict(zip(command[3::2], command[4::2]))
            assert int(probe["--port"]) == args.metrics_port
            assert probe["--role"] == argv[0]
            # The probe must finish before the kubelet gives up on it.
            assert float(probe["--within"]) < container[kind]["timeoutSeconds"]
