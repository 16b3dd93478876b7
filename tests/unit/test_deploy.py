"""deploy/ stays true to the code: every variable it sets is a setting a process reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from intentflow.consumer.settings import ConsumerSettings
from intentflow.producer.settings import BridgeSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KNOWN = {name.upper() for name in [*ConsumerSettings.model_fields, *BridgeSettings.model_fields]}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_configmap_and_secrets_set_only_known_settings() -> None:
    for name in ("configmap.yaml", "secret.example.yaml"):
        docs = documents(DEPLOY / "k8s" / name)
        assert docs, name
        for doc in docs:
            keys = set(doc.get("data") or doc.get("stringData") or {})
            assert keys <= KNOWN, (name, doc["metadata"]["name"], keys - KNOWN)


def test_containers_set_only_known_settings_and_run_real_commands() -> None:
    commands = set()
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in documents(path):
            spec = doc.get("spec", {})
            spec = spec.get("jobTemplate", {}).get("spec", spec)  # a CronJob's pod, or a workload's
            spec = spec.get("template", {}).get("spec", {})
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                commands.add(tuple(container["command"]))
                names = {env["name"] for env in container.get("env", [])}
                assert names <= KNOWN, (path.name, names - KNOWN)
    assert commands == {
        ("order-consumer", "migrate"),
        ("order-consumer", "run"),
        ("order-consumer", "prune", "--older-than", "35d"),
        ("stripe-bridge",),
    }


def test_compose_services_set_only_known_settings() -> None:
    (compose,) = documents(DEPLOY / "compose.yaml")
    for name in ("migrate", "bridge", "consumer"):
        env = set(compose["services"][name]["environment"])
        assert env <= KNOWN, (name, env - KNOWN)


def cannot_start_without(settings: type[BaseSettings], monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The variables a process refuses to start without: what an empty environment lacks."""
    for name in settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    try:
        settings()
    except ValidationError as exc:
        return {str(error["loc"][0]).upper() for error in exc.errors()}
    return set()


def test_compose_makes_the_operator_set_what_the_bridge_cannot_start_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No default in the file for them (`${NAME:?why}`): compose refuses to start, saying why."""
    required = cannot_start_without(BridgeSettings, monkeypatch)
    assert {"STRIPE_WEBHOOK_SECRET", "STRIPE_LIVEMODE"} <= required
    (compose,) = documents(DEPLOY / "compose.yaml")
    env = compose["services"]["bridge"]["environment"]
    for name in required:
        assert str(env.get(name, "")).startswith(f"${{{name}:?"), (name, env.get(name))
