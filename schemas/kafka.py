"""How both processes reach a Kafka cluster: addresses, TLS, SASL and client id.

`KafkaConnection` is the part of each process's settings that says how to
connect, under the names Kafka users know (`security.protocol` is
KAFKA_SECURITY_PROTOCOL, `sasl.mechanism` is KAFKA_SASL_MECHANISM, and so on);
`client_kwargs` turns it into the keyword arguments every aiokafka client takes
(AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient, AIOKafkaClient).

A combination that cannot work (SASL without credentials, credentials or
certificates the chosen protocol would silently ignore, a certificate without
its key, a file that cannot be read or loaded) is refused when the settings
are read, with one message per variable, rather than at the first connection,
where aiokafka's error names no setting and the consumer would retry it as an
outage. Secrets are SecretStr: they never appear in a repr or a log line.

No aiokafka import: the SSL context is built with the standard library, the
same two calls `aiokafka.helpers.create_ssl_context` makes, so `schemas` stays
free of the client library.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator

from intentflow.schemas.config import check_bootstrap_servers

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
MECHANISMS = ", ".join(get_args(SaslMechanism))

# Fields whose empty value (`KAFKA_SASL_MECHANISM=`, a compose `${VAR:-}`) means unset.
UNSET_WHEN_EMPTY = (
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_key_password",
    "kafka_ssl_keyfile",
)


class KafkaConnection(BaseModel):
    """The connection settings both services share; each sets its own client id default.

    Field order matters: each check reads the fields declared before it.
    """

    kafka_bootstrap_servers: str = Field(default="127.0.0.1:9092", min_length=1)
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = Field(default=None, validate_default=True)
    kafka_sasl_username: str | None = Field(default=None, validate_default=True)
    kafka_sasl_password: SecretStr | None = Field(default=None, validate_default=True)
    # Unset with SSL/SASL_SSL: the system's CAs (enough for Confluent Cloud and MSK).
    kafka_ssl_cafile: Path | None = None
    # Mutual TLS: the client certificate (PEM) and its private key, both or neither.
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_keyfile: Path | None = Field(default=None, validate_default=True)
    # Kafka's client.id: the name the broker's logs and quotas see.
    kafka_client_id: str = Field(min_length=1)

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _broker_addresses(cls, value: str) -> str:
        return check_bootstrap_servers(value)

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(*UNSET_WHEN_EMPTY, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(text, str) and not text.strip() else value

    @field_validator("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
    @classmethod
    def _sasl_needs_all_three(cls, value: object, info: ValidationInfo) -> object:
        protocol = info.data.get("kafka_security_protocol")
        if protocol is None:  # refused itself
            return value
        if protocol in SASL_PROTOCOLS and value is None:
            which = f"one of {MECHANISMS}" if info.field_name == "kafka_sasl_mechanism" else "set"
            raise ValueError(f"must be {which} with KAFKA_SECURITY_PROTOCOL={protocol}")
        if protocol not in SASL_PROTOCOLS and value is not None:
            raise ValueError(
                f"is set, but KAFKA_SECURITY_PROTOCOL={protocol} does not authenticate: "
                "use SASL_SSL (or SASL_PLAINTEXT), or unset it"
            )
        return value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _readable_with_tls(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        protocol = info.data.get("kafka_security_protocol")
        if protocol is not None and protocol not in TLS_PROTOCOLS:
            raise ValueError(
                f"is set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS: "
                "use SSL or SASL_SSL, or unset it"
            )
        try:
            value.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {value} ({exc.strerror or exc})") from None
        if info.field_name == "kafka_ssl_cafile":
            try:
                ssl.create_default_context(cafile=value)
            except ssl.SSLError as exc:
                raise ValueError(f"{value} is not a PEM CA certificate ({exc.reason})") from None
        return value

    @field_validator("kafka_ssl_keyfile")
    @classmethod
    def _key_with_its_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "kafka_ssl_certfile" not in info.data:  # the certificate was refused itself
            return value
        certfile = info.data["kafka_ssl_certfile"]
        password = info.data.get("kafka_ssl_key_password")
        if certfile is not None and value is None:
            raise ValueError("must be set with KAFKA_SSL_CERTFILE (the certificate's private key)")
        if certfile is None and value is not None:
            raise ValueError("is set without KAFKA_SSL_CERTFILE (the client certificate)")
        if value is None and password is not None:
            raise ValueError("must be set when KAFKA_SSL_KEY_PASSWORD is (the key it opens)")
        if certfile is not None and value is not None:
            try:
                ssl.create_default_context().load_cert_chain(
                    certfile, value, key_password(password)
                )
            except ssl.SSLError as exc:
                why = exc.reason or "the key cannot be decrypted or parsed"
                raise ValueError(
                    f"does not load with KAFKA_SSL_CERTFILE ({why}): check that the key "
                    "matches the certificate, and KAFKA_SSL_KEY_PASSWORD"
                ) from None
        return value

    @property
    def kafka_uses_tls(self) -> bool:
        return self.kafka_security_protocol in TLS_PROTOCOLS


def ssl_context(settings: KafkaConnection) -> ssl.SSLContext:
    """What `aiokafka.helpers.create_ssl_context` builds (the server's certificate and
    name verified, against the CA file or the system's CAs), the key never prompted for."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile is not None:
        context.load_cert_chain(
            settings.kafka_ssl_certfile,
            settings.kafka_ssl_keyfile,
            key_password(settings.kafka_ssl_key_password),
        )
    return context


def key_password(password: SecretStr | None) -> Callable[[], str]:
    """The key's password for `load_cert_chain`; none given, an empty one. Without it,
    OpenSSL would ask for one on the terminal, and a service would hang at start."""
    return lambda: password.get_secret_value() if password is not None else ""


def client_kwargs(settings: KafkaConnection, role: str | None = None) -> dict[str, Any]:
    """The keyword arguments that connect any aiokafka client as `settings` say.

    `role` names a tool's own clients apart from the service's (client.id
    `order-consumer-dlq`), so that the broker's logs tell them apart.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"{settings.kafka_client_id}-{role}" if role else settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_uses_tls:
        kwargs["ssl_context"] = ssl_context(settings)
    if settings.kafka_security_protocol in SASL_PROTOCOLS:
        # aiokafka's names say "plain", but SCRAM reads the same two arguments.
        password = settings.kafka_sasl_password
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs
