"""SASL/TLS settings (MSK, Confluent Cloud) reach every Kafka client spendgate builds."""

from __future__ import annotations

import ssl

import faust

from spendgate.adapters import kafka
from spendgate.settings import Settings
from spendgate.worker.faust_app import broker_credentials


def sasl_ssl(bootstrap: str) -> Settings:
    return Settings(
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="spender",
        kafka_sasl_password="s3cret",  # type: ignore[arg-type]  # pydantic makes it a SecretStr
    )


async def test_plaintext_is_the_default_and_adds_nothing() -> None:
    settings = Settings(kafka_bootstrap="plain:9092")
    assert kafka.client_security(settings) == {}
    assert kafka.security_for("plain:9092") == {}
    assert broker_credentials(settings) is None
    producer = kafka.producer(settings)
    assert producer.client._security_protocol == "PLAINTEXT"
    await producer.stop()


async def test_sasl_ssl_reaches_producer_consumer_and_bootstrap_only_clients() -> None:
    settings = sasl_ssl("msk-1:9096,msk-2:9096")
    producer = kafka.producer(settings)
    consumer = kafka.consumer(settings, "spend.usage")
    for client in (producer.client, consumer._client):
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "spender"
        assert client._sasl_plain_password == "s3cret"
        assert isinstance(client._ssl_context, ssl.SSLContext)
    await producer.stop()
    await consumer.stop()
    # followers, watermark probes and the outbox only know the bootstrap: they get the same
    options = kafka.security_for("msk-1:9096,msk-2:9096")
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_password"] == "s3cret"
    assert kafka.security_for("elsewhere:9092") == {}


def test_faust_worker_gets_the_same_credentials() -> None:
    creds = broker_credentials(sasl_ssl("conf:9092"))
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "spender" and creds.password == "s3cret"
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None
    tls_only = broker_credentials(Settings(kafka_bootstrap="tls:9093", kafka_security_protocol="SSL"))
    assert isinstance(tls_only, faust.SSLCredentials)


def test_the_password_never_shows_in_settings_repr() -> None:
    assert "s3cret" not in repr(sasl_ssl("x:1"))
