"""Process settings: one frozen object per process, read from SPENDGATE_* environment variables.

Nothing else in spendgate reads ``os.environ``; the CLI builds a ``Settings`` and passes it down.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class FailMode(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Settings(BaseSettings):
    """Every knob of spendgate. Defaults suit the embedded dev stack."""

    model_config = SettingsConfigDict(env_prefix="SPENDGATE_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    # Managed Kafka (MSK, Confluent Cloud): SASL and/or TLS. Every client spendgate opens uses them.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle; unset = the system's CAs")
    database_url: str = ""
    topic_prefix: str = "spend."
    partitions: int = Field(default=8, ge=1, le=1024)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    kafka_port: int = Field(default=9092, ge=0, le=65535)
    worker_web_port: int = Field(default=6066, ge=0, le=65535)
    data_dir: Path = Path(".spendgate")

    admin_token: SecretStr | None = None
    fail_mode: FailMode = FailMode.OPEN
    max_staleness_s: float = Field(default=30.0, gt=0)
    write_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="a control-plane write not visible (on spend.config, applied) by then answers 503",
    )
    dependency_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="a request waiting longer on Postgres or the broker answers 503 with Retry-After",
    )
    state_interval_ms: int = Field(default=100, ge=1)
    dedupe_horizon_h: int = Field(default=24, ge=1)
    replication_factor: int = Field(default=1, ge=1, description="of the worker's changelog topics")
    worker_id: str = "spendgate-worker"
    worker_store: Literal["memory://", "rocksdict://"] = Field(
        default="memory://",
        description="worker table store; rocksdict:// keeps tables in RocksDB under data_dir",
    )
    log_level: str = "INFO"
    webhook_allow_hosts: str = Field(
        default="",
        description="comma-separated hosts, IPs or CIDRs webhooks may target even when link-local"
        " or a cloud metadata address (refused otherwise)",
    )

    dev: bool = False

    def topic(self, name: str) -> str:
        """Full topic name for a contract topic short name (``usage`` -> ``spend.usage``)."""
        return f"{self.topic_prefix}{name}"


class SettingsError(ValueError):
    """An environment variable holds an invalid value; the message is one line naming it."""


def settings_from_env(**overrides: object) -> Settings:
    """``Settings`` from the environment, or ``SettingsError`` naming the first bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise SettingsError(f"invalid SPENDGATE_{field.upper()}: {first['msg']}") from None
