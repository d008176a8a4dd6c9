"""The ``spendgate`` command line (CONTRACT §5): dev | worker | api | notifier | replay | schemas.

Every command builds one :class:`Settings` from SPENDGATE_* and hands it down. Operator
mistakes (an unset or unreachable broker/database, a taken port, an invalid setting) end in a
one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from spendgate.settings import Settings, SettingsError, settings_from_env

EXIT_USAGE = 2

app = typer.Typer(
    name="spendgate",
    help="Event-sourced spend accounting and budget enforcement.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


class PreflightError(RuntimeError):
    """A service cannot start: the message names the SPENDGATE_* variable to fix."""


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"spendgate: {message}", err=True)
    raise typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; an invalid value is a one-line error (exit 2)."""
    try:
        return settings_from_env(**overrides)
    except SettingsError as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------------ preflight


def _reachable(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.strip()
    if address.startswith("["):  # [ipv6]:port
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host, int(port)


def check_kafka(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`PreflightError` unless some bootstrap server accepts a TCP connection."""
    servers = [s for s in bootstrap.split(",") if s.strip()]
    if not servers:
        raise PreflightError("SPENDGATE_KAFKA_BOOTSTRAP is not set (host:port[,host:port])")
    reasons = []
    for server in servers:
        try:
            host, port = _split_host_port(server.removeprefix("PLAINTEXT://"), 9092)
        except ValueError:
            raise PreflightError(
                f"SPENDGATE_KAFKA_BOOTSTRAP={bootstrap} is not host:port[,host:port]"
            ) from None
        reason = _reachable(host, port, timeout_s)
        if reason is None:
            return
        reasons.append(f"{host}:{port}: {reason}")
    raise PreflightError(f"SPENDGATE_KAFKA_BOOTSTRAP={bootstrap} is unreachable ({'; '.join(reasons)})")


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as unparsable
        return "<unparsable>"
    if "password" not in params:
        return url
    if "://" in url:
        scheme, rest = url.split("://", 1)
        creds, at, tail = rest.rpartition("@")
        if at:
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{tail}"
    params["password"] = "***"
    return make_conninfo(**{k: str(v) for k, v in params.items()})


def check_database(url: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`PreflightError` unless the database server accepts a connection."""
    from psycopg.conninfo import conninfo_to_dict

    if not url.strip():
        raise PreflightError(
            "SPENDGATE_DATABASE_URL is not set (e.g. postgresql://user:pass@host:5432/spendgate)"
        )
    try:
        params = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - psycopg raises its own ProgrammingError here
        raise PreflightError("SPENDGATE_DATABASE_URL is not a valid PostgreSQL URL") from None
    host = str(params.get("host") or params.get("hostaddr") or "localhost").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    if host.startswith("/"):  # Unix socket directory
        path = Path(host) / f".s.PGSQL.{port}"
        if not path.exists():
            raise PreflightError(
                f"SPENDGATE_DATABASE_URL={redact_url(url)} is unreachable (no socket {path})"
            )
        return
    reason = _reachable(host, port, timeout_s)
    if reason is not None:
        raise PreflightError(
            f"SPENDGATE_DATABASE_URL={redact_url(url)} is unreachable ({host}:{port}: {reason})"
        )


def preflight(settings: Settings, *, kafka: bool = True, database: bool = True) -> None:
    """Check that the broker and the database accept TCP connections before a service starts.

    Raises :class:`PreflightError` with a one-line message naming the variable to fix.
    """
    if database:
        check_database(settings.database_url)
    if kafka:
        check_kafka(settings.kafka_bootstrap)


def _preflight_or_exit(settings: Settings, *, database: bool = True) -> None:
    try:
        preflight(settings, database=database)
    except PreflightError as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------------- commands


def _load(module: str, attr: str, what: str) -> Callable[..., Any]:
    """Import ``module.attr`` lazily; a module that does not exist yet is a clear error."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            _fail(f"{what} is not available in this build ({module} is missing)", 1)
        raise
    target = getattr(mod, attr, None)
    if target is None:
        _fail(f"{what} is not available in this build ({module}.{attr} is missing)", 1)
    return target  # type: ignore[no-any-return]


def _call(target: Callable[..., Any], *args: Any) -> Any:
    result = target(*args)
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


@app.command()
def dev(
    keep_db: bool = typer.Option(
        False,
        "--keep-db",
        help="Keep the Postgres data of the previous run. By default it is wiped, because "
        "the embedded broker is in-memory and starts empty every time.",
    ),
) -> None:
    """Run the embedded stack: broker, Postgres, worker and API (what `make run` starts)."""
    from spendgate.dev import DevError, run_dev

    settings = load_settings(dev=True)
    try:
        code = run_dev(settings, keep_db=keep_db)
    except DevError as exc:
        _fail(str(exc), exc.exit_code)
    raise typer.Exit(code)


@app.command()
def worker() -> None:
    """Run a worker against SPENDGATE_KAFKA_BOOTSTRAP (it needs no database)."""
    settings = load_settings()
    _preflight_or_exit(settings, database=False)
    _call(_load("spendgate.worker.main", "run", "the worker"), settings)


@app.command()
def api() -> None:
    """Run the HTTP API (gate + control plane) on SPENDGATE_API_HOST:SPENDGATE_API_PORT."""
    settings = load_settings()
    _preflight_or_exit(settings)
    _call(_load("spendgate.api.main", "run", "the API"), settings)


@app.command()
def notifier() -> None:
    """Deliver spend.alerts to the webhooks of the control plane (any number of replicas)."""
    settings = load_settings()
    _preflight_or_exit(settings)
    _call(_load("spendgate.notifier", "run", "the notifier"), settings)


@app.command()
def replay(
    from_: str = typer.Option(
        "earliest", "--from", metavar="earliest|TIME", help="only events with occurred_at >= TIME (RFC 3339)"
    ),
    to: str | None = typer.Option(None, metavar="TIME", help="only events with occurred_at < TIME"),
    scope: str | None = typer.Option(
        None, metavar="PATTERN", help="only scopes matching this fnmatch pattern, e.g. 'team:*'"
    ),
    budgets: Path | None = typer.Option(
        None,
        metavar="FILE",
        help="what-if: use these budgets ({scope: {limits, tz}}, YAML or JSON) instead of the live ones",
    ),
    report_format: str = typer.Option("table", "--format", help="table, csv or json"),
    out: Path | None = typer.Option(None, metavar="PATH", help="write the report here instead of stdout"),
    diff_live: bool = typer.Option(
        False,
        "--diff-live",
        help="compare with the latest spend.state per scope; exit 1 listing every difference",
    ),
    as_of: str | None = typer.Option(
        None,
        metavar="OFFSETS|TIME",
        help="only records before this log position: 'p:o,p:o' (exclusive) or a time",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
) -> None:
    """Rebuild spend and decisions from the usage topic, without touching live state.

    Exit 0 when done (with --diff-live: no difference), 1 when differences were found (listed
    on stderr), 2 on a usage error or an unreachable broker. Read-only: no consumer group, no
    offset commit, nothing produced.
    """
    from spendgate.replay import ReplayOptions, ReportFormat, main_async

    if report_format not in {f.value for f in ReportFormat}:
        _fail(f"--format: must be table, csv or json, not {report_format!r}")
    options = ReplayOptions(
        from_=from_,
        to=to,
        scope=scope,
        budgets=budgets,
        format=ReportFormat(report_format),
        out=out,
        diff_live=diff_live,
        as_of=as_of,
        quiet=quiet,
    )
    raise typer.Exit(asyncio.run(main_async(options, settings=load_settings())))


@app.command()
def schemas(
    directory: Path = typer.Argument(Path("schemas"), help="Where to write the JSON Schemas."),
) -> None:
    """Write the JSON Schema of every record to schemas/."""
    export = _load("spendgate.records", "export_schemas", "schema export")
    directory.mkdir(parents=True, exist_ok=True)
    for path in export(directory) or []:
        typer.echo(str(path))


@app.command()
def migrate() -> None:
    """Apply pending Postgres migrations to SPENDGATE_DATABASE_URL (idempotent)."""
    from spendgate.store.migrate import MigrationError, apply_migrations

    settings = load_settings()
    try:
        check_database(settings.database_url)
        applied = apply_migrations(settings.database_url)
    except (PreflightError, MigrationError) as exc:
        _fail(str(exc))
    typer.echo(f"applied {applied}" if applied else "schema up to date")


@app.command()
def topics() -> None:
    """Create the Kafka topics that do not exist yet (idempotent)."""
    from spendgate.adapters.kafka import KafkaUnavailable, ensure_topics

    settings = load_settings()
    try:
        check_kafka(settings.kafka_bootstrap)
        created = asyncio.run(ensure_topics(settings))
    except (PreflightError, KafkaUnavailable) as exc:
        _fail(str(exc))
    typer.echo(f"created {', '.join(created)}" if created else "topics up to date")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
