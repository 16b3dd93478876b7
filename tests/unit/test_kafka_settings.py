"""Reaching a secured Kafka: the settings, their checks, and aiokafka's arguments.

The embedded broker is started without TLS or authentication, so these tests
check what can be checked without one: each protocol and mechanism becomes the
exact keyword arguments aiokafka 0.14 takes (and its clients accept), the SSL
context trusts the CA file and presents the client certificate (a TLS handshake
in memory against a server that requires it), every client the services build
carries them, and each combination that cannot work is refused with one line
that names the variable and never shows a secret. Certificates are made with
the `openssl` command for the session.
"""

from __future__ import annotations

import inspect
import os
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from pydantic import ValidationError

from intentflow.consumer import connections, kafka_producer, preflight
from intentflow.consumer.__main__ import main as consumer_main
from intentflow.consumer.bootstrap import order_events
from intentflow.consumer.connections import create_consumer, create_dead_letters
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import dlq, prune
from intentflow.producer import publisher
from intentflow.producer.publisher import Publisher
from intentflow.producer.settings import BridgeSettings
from intentflow.schemas.config import describe
from intentflow.schemas.kafka import client_kwargs

SASL_PASSWORD = "sasl-pass-e1f2"
KEY_PASSWORD = "key-pass-7c3d"
WEBHOOK_SECRET = "whsec_unit"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for `localhost` and a client certificate, signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    where = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test-ca")
    for name, extra in (("server", ["-addext", "subjectAltName=DNS:localhost"]), ("client", [])):
        signed = ["-CA", "ca.pem", "-CAkey", "ca.key", "-subj", f"/CN={name}", *extra]
        openssl("req", "-x509", *ec, *signed, "-keyout", f"{name}.key", "-out", f"{name}.pem")
    openssl("pkey", "-in", "client.key", "-out", "client-locked.key", "-aes256",
            "-passout", f"pass:{KEY_PASSWORD}")  # fmt: skip
    (where / "not-a-cert.pem").write_text("hello\n")
    return {path.name.removesuffix(".pem"): path for path in where.iterdir()}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No KAFKA_* variable of the machine leaks into these settings."""
    for name in [n for n in os.environ if n.startswith("KAFKA_")]:
        monkeypatch.delenv(name)
    yield


def consumer(**values: Any) -> ConsumerSettings:
    return ConsumerSettings(**values)


def sasl(protocol: str = "SASL_SSL", mechanism: str = "SCRAM-SHA-512", **more: Any) -> Any:
    return {
        "kafka_security_protocol": protocol,
        "kafka_sasl_mechanism": mechanism,
        "kafka_sasl_username": "orders",
        "kafka_sasl_password": SASL_PASSWORD,
        **more,
    }


# --- The translation into aiokafka's arguments ---


def test_plaintext_is_the_default_and_names_the_client() -> None:
    assert client_kwargs(consumer()) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "client_id": "order-consumer",
        "security_protocol": "PLAINTEXT",
    }
    bridge = BridgeSettings(stripe_webhook_secret=WEBHOOK_SECRET, stripe_livemode=False)
    assert client_kwargs(bridge)["client_id"] == "stripe-bridge"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_passes_the_mechanism_and_the_credentials(mechanism: str) -> None:
    settings = consumer(**sasl("SASL_PLAINTEXT", mechanism), kafka_client_id="shop")
    assert client_kwargs(settings) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "client_id": "shop",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "orders",
        "sasl_plain_password": SASL_PASSWORD,
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_adds_a_context_that_trusts_the_ca_file(
    pki: dict[str, Path], mechanism: str
) -> None:
    settings = consumer(**sasl("SASL_SSL", mechanism), kafka_ssl_cafile=pki["ca"])
    kwargs = client_kwargs(settings)
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": "127.0.0.1:9092",
        "client_id": "order-consumer",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "orders",
        "sasl_plain_password": SASL_PASSWORD,
    }
    assert_verifies_with_test_ca(context)


def test_ssl_alone_has_a_context_and_no_credentials(pki: dict[str, Path]) -> None:
    kwargs = client_kwargs(consumer(kafka_security_protocol="SSL", kafka_ssl_cafile=pki["ca"]))
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": "127.0.0.1:9092",
        "client_id": "order-consumer",
        "security_protocol": "SSL",
    }
    assert_verifies_with_test_ca(context)


def assert_verifies_with_test_ca(context: ssl.SSLContext) -> None:
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    trusted: list[Any] = context.get_ca_certs()
    issuers = [dict(field[0] for field in ca["subject"]) for ca in trusted]
    assert {"commonName": "test-ca"} in issuers


def test_ssl_without_a_ca_file_trusts_the_system_cas() -> None:
    context = client_kwargs(consumer(kafka_security_protocol="SSL"))["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("locked", [False, True])
def test_mutual_tls_presents_the_client_certificate(pki: dict[str, Path], locked: bool) -> None:
    key = {"kafka_ssl_keyfile": pki["client-locked.key"], "kafka_ssl_key_password": KEY_PASSWORD}
    settings = consumer(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["client"],
        **(key if locked else {"kafka_ssl_keyfile": pki["client.key"]}),
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki["server"], pki["server.key"])
    server.load_verify_locations(pki["ca"])
    server.verify_mode = ssl.CERT_REQUIRED
    peer = handshake(client_kwargs(settings)["ssl_context"], server)
    assert ((("commonName", "client"),)) in peer["subject"]


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> Any:
    """A TLS handshake in memory, the client connecting to `localhost`; the client's certificate."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_hostname="localhost")
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    pending = {client_end, server_end}
    for _ in range(10):
        for end in list(pending):
            try:
                end.do_handshake()
                pending.discard(end)
            except ssl.SSLWantReadError:
                pass
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if not pending:
            return server_end.getpeercert()
    raise AssertionError("the handshake did not finish")


def test_a_tools_clients_carry_its_name_after_the_client_id() -> None:
    assert client_kwargs(consumer(kafka_client_id="shop"), "dlq")["client_id"] == "shop-dlq"


@pytest.mark.parametrize(
    "values",
    [{}, sasl("SASL_PLAINTEXT", "PLAIN"), sasl("SASL_SSL", "SCRAM-SHA-256"),
     {"kafka_security_protocol": "SSL"}],
    ids=["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"],
)  # fmt: skip
async def test_every_aiokafka_client_accepts_the_arguments(values: dict[str, Any]) -> None:
    kwargs = client_kwargs(consumer(**values))
    consumer_ = AIOKafkaConsumer(**kwargs, group_instance_id="order-consumer-0")
    await consumer_.stop()
    producer = AIOKafkaProducer(**kwargs)
    await producer.stop()
    admin = AIOKafkaAdminClient(**kwargs)
    await admin.close()
    client = AIOKafkaClient(**kwargs)
    await client.close()


# --- Every client the services build carries them ---


class Refused(Exception):
    """What the recording clients raise instead of connecting."""


def recording(made: list[dict[str, Any]]) -> type:
    class Recording:
        """Any aiokafka client: says how it was made, connects to nothing."""

        def __init__(self, *topics: str, **kwargs: Any) -> None:
            made.append(kwargs)

        async def start(self) -> None:
            raise Refused

        async def bootstrap(self) -> None:
            raise Refused

        async def stop(self) -> None: ...
        async def close(self) -> None: ...

    return Recording


async def nothing(*args: Any) -> None: ...


SITES: dict[str, tuple[list[tuple[object, str]], Callable[[Any], object]]] = {
    "consumer": ([(connections, "AIOKafkaConsumer")], create_consumer),
    "dead letters": ([(kafka_producer, "AIOKafkaProducer")], create_dead_letters),
    "order events": ([(kafka_producer, "AIOKafkaProducer")], lambda s: order_events(s)()),
    "preflight": ([(preflight, "AIOKafkaClient")], lambda s: preflight.check_topics(s, ["t"])),
    "dlq topics": ([(dlq, "AIOKafkaClient")], lambda s: dlq.describe_topics(s, ["t"])),
    "dlq read": ([(dlq, "AIOKafkaConsumer")], lambda s: dlq.read_dead_letters(s, "t", [0])),
    "dlq replay": ([(dlq, "AIOKafkaProducer")], lambda s: dlq.send(s, [])),
    "prune": ([(prune, "AIOKafkaAdminClient")], lambda s: prune._describe(s)),
    "bridge": ([(publisher, "AIOKafkaProducer")], lambda s: Publisher(s).start()),
}


@pytest.mark.parametrize("site", list(SITES))
async def test_every_client_the_services_build_is_secured(
    pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    made: list[dict[str, Any]] = []
    patches, build = SITES[site]
    for where, name in patches:
        monkeypatch.setattr(where, name, recording(made))
    monkeypatch.setattr(prune, "check_topics", nothing)
    values = sasl("SASL_SSL", "SCRAM-SHA-512", kafka_ssl_cafile=pki["ca"])
    settings: Any = (
        BridgeSettings(stripe_webhook_secret=WEBHOOK_SECRET, stripe_livemode=False, **values)
        if site == "bridge"
        else consumer(**values)
    )
    built = build(settings)
    if inspect.isawaitable(built):
        with pytest.raises(Refused):
            await built
    [kwargs] = made
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == (
        "orders",
        SASL_PASSWORD,
    )
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["client_id"].startswith(settings.kafka_client_id)


# --- Static membership ---


@pytest.mark.parametrize(("given", "expected"), [("order-consumer-0", "order-consumer-0"),
                                                 ("", None), (None, None)])  # fmt: skip
def test_the_consumer_joins_as_a_static_member_when_given_an_instance_id(
    monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str | None
) -> None:
    if given is not None:
        monkeypatch.setenv("KAFKA_GROUP_INSTANCE_ID", given)
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(connections, "AIOKafkaConsumer", recording(made))
    create_consumer(ConsumerSettings())
    assert made[0]["group_instance_id"] == expected
    assert made[0]["group_id"] == "order-consumer"


# --- What is refused ---

REFUSED = [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL: Input should be"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
      "KAFKA_SASL_PASSWORD": SASL_PASSWORD},
     "KAFKA_SASL_USERNAME: must be set with KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
      "KAFKA_SASL_USERNAME": "orders", "KAFKA_SASL_PASSWORD": ""},
     "KAFKA_SASL_PASSWORD: must be set with KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
      "KAFKA_SASL_USERNAME": "orders", "KAFKA_SASL_PASSWORD": SASL_PASSWORD},
     "KAFKA_SASL_MECHANISM: Input should be"),
    ({"KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
     "KAFKA_SASL_MECHANISM: is set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not authenticate"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_PASSWORD": SASL_PASSWORD},
     "KAFKA_SASL_PASSWORD: is set, but KAFKA_SECURITY_PROTOCOL=SSL does not authenticate"),
    ({"KAFKA_SSL_CAFILE": "{ca}"},
     "KAFKA_SSL_CAFILE: is set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{dir}/missing.pem"},
     "KAFKA_SSL_CAFILE: cannot read {dir}/missing.pem (No such file or directory)"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{dir}"},
     "KAFKA_SSL_CAFILE: cannot read {dir} (Is a directory)"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{not-a-cert}"},
     "KAFKA_SSL_CAFILE: {not-a-cert} is not a PEM CA certificate"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "{client}"},
     "KAFKA_SSL_KEYFILE: must be set with KAFKA_SSL_CERTFILE"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": "{client-locked.key}"},
     "KAFKA_SSL_KEYFILE: is set without KAFKA_SSL_CERTFILE"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD},
     "KAFKA_SSL_KEYFILE: must be set when KAFKA_SSL_KEY_PASSWORD is"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "{client}",
      "KAFKA_SSL_KEYFILE": "{ca.key}"},
     "KAFKA_SSL_KEYFILE: does not load with KAFKA_SSL_CERTFILE (KEY_VALUES_MISMATCH)"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "{client}",
      "KAFKA_SSL_KEYFILE": "{client-locked.key}", "KAFKA_SSL_KEY_PASSWORD": SASL_PASSWORD},
     "KAFKA_SSL_KEYFILE: does not load with KAFKA_SSL_CERTFILE (the key cannot be decrypted"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "{client}",
      "KAFKA_SSL_KEYFILE": "{client-locked.key}"},  # and no password: never asked on a terminal
     "KAFKA_SSL_KEYFILE: does not load with KAFKA_SSL_CERTFILE (the key cannot be decrypted"),
    ({"KAFKA_CLIENT_ID": ""}, "KAFKA_CLIENT_ID: String should have at least 1 character"),
]  # fmt: skip


def filled(text: str, pki: dict[str, Path]) -> str:
    for name, path in pki.items():
        text = text.replace(f"{{{name}}}", str(path))
    return text.replace("{dir}", str(pki["ca"].parent))


@pytest.mark.parametrize(("environment", "named"), REFUSED)
@pytest.mark.parametrize("service", [ConsumerSettings, BridgeSettings])
def test_a_combination_that_cannot_work_is_refused_naming_the_variable(
    pki: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    service: type[ConsumerSettings | BridgeSettings],
    environment: dict[str, str],
    named: str,
) -> None:
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("STRIPE_LIVEMODE", "false")
    for name, value in environment.items():
        monkeypatch.setenv(name, filled(value, pki))
    with pytest.raises(ValidationError) as refused:
        service()
    line = describe(refused.value)
    assert line.startswith(filled(named, pki))
    assert "; " not in line  # one problem, one message
    assert SASL_PASSWORD not in line and KEY_PASSWORD not in line


def test_sasl_with_nothing_else_names_each_missing_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    assert consumer_main(["run"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("order-consumer: configuration error: KAFKA_SASL_MECHANISM: must be")
    assert "; KAFKA_SASL_USERNAME: must be set" in line
    assert "; KAFKA_SASL_PASSWORD: must be set" in line


def test_names_are_accepted_in_any_case_and_empty_means_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in sasl("sasl_plaintext", "scram-sha-256", kafka_ssl_cafile="").items():
        monkeypatch.setenv(name.upper(), str(value))
    settings = ConsumerSettings()
    assert settings.kafka_security_protocol == "SASL_PLAINTEXT"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-256"
    assert settings.kafka_ssl_cafile is None


def test_secrets_never_appear_in_the_settings_repr(pki: dict[str, Path]) -> None:
    for settings in (
        consumer(
            **sasl(),
            kafka_ssl_cafile=pki["ca"],
            kafka_ssl_certfile=pki["client"],
            kafka_ssl_keyfile=pki["client-locked.key"],
            kafka_ssl_key_password=KEY_PASSWORD,
        ),
        BridgeSettings(stripe_webhook_secret=WEBHOOK_SECRET, stripe_livemode=False, **sasl()),
    ):
        for shown in (repr(settings), str(settings), settings.model_dump_json()):
            assert SASL_PASSWORD not in shown and KEY_PASSWORD not in shown
            assert "orders" in shown  # the user name is not a secret
