"""The one-line errors a service prints when its broker or database is missing."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from spendgate.cli import PreflightError, app, check_database, check_kafka, preflight, redact_url
from spendgate.settings import Settings


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def open_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_unset_database_url_names_the_variable() -> None:
    with pytest.raises(PreflightError, match=r"^SPENDGATE_DATABASE_URL is not set"):
        check_database("")


def test_unreachable_database_names_the_variable_without_the_password(closed_port: int) -> None:
    with pytest.raises(PreflightError) as info:
        check_database(f"postgresql://spend:hunter2@127.0.0.1:{closed_port}/spendgate")
    message = str(info.value)
    assert message.startswith("SPENDGATE_DATABASE_URL=postgresql://spend:***@127.0.0.1")
    assert "unreachable" in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_unreachable_kafka_names_the_variable(closed_port: int) -> None:
    with pytest.raises(PreflightError, match=r"^SPENDGATE_KAFKA_BOOTSTRAP=.* is unreachable"):
        check_kafka(f"127.0.0.1:{closed_port}")


def test_one_reachable_bootstrap_server_is_enough(closed_port: int, open_port: int) -> None:
    check_kafka(f"127.0.0.1:{closed_port},127.0.0.1:{open_port}")


def test_preflight_passes_when_both_accept_connections(open_port: int) -> None:
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{open_port}",
        database_url=f"postgresql://u@127.0.0.1:{open_port}/db",
    )
    preflight(settings)


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql://a:b@h:1/d") == "postgresql://a:***@h:1/d"
    assert redact_url("postgresql://a@h/d") == "postgresql://a@h/d"
    assert "secret" not in redact_url("host=h user=a password=secret")


@pytest.mark.parametrize("command", ["api", "notifier"])
def test_api_without_database_exits_2_with_one_line(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPENDGATE_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, [command])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]]
    assert "SPENDGATE_DATABASE_URL" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["worker", "api", "notifier"])
def test_service_with_unreachable_kafka_exits_2_with_one_line(
    command: str, monkeypatch: pytest.MonkeyPatch, open_port: int, closed_port: int
) -> None:
    monkeypatch.setenv("SPENDGATE_DATABASE_URL", f"postgresql://u@127.0.0.1:{open_port}/db")
    monkeypatch.setenv("SPENDGATE_KAFKA_BOOTSTRAP", f"127.0.0.1:{closed_port}")
    result = CliRunner().invoke(app, [command])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "SPENDGATE_KAFKA_BOOTSTRAP" in result.output


def test_invalid_setting_exits_2_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_PARTITIONS", "many")
    result = CliRunner().invoke(app, ["api"])
    assert result.exit_code == 2
    assert "SPENDGATE_PARTITIONS" in result.output
