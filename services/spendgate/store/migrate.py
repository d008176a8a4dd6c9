"""A small, forward-only migration runner for spendgate's Postgres schema.

Migrations are files ``NNN_name.sql`` in ``store/migrations/`` (shipped as package data),
applied in ascending ``NNN`` order. Each is applied in its own transaction together with
its row in ``schema_migrations`` (version, name, sha256, applied_at): a migration is either
fully applied and recorded, or not at all.

- Idempotent: applied versions are skipped, so it runs at every start of the api and dev.
- Concurrency-safe: a Postgres advisory lock serialises runners, so several api instances
  starting together apply each migration once.
- Applied files are immutable: a changed checksum raises :class:`MigrationError` (write a
  new migration instead of editing an applied one).

psycopg errors do not escape: callers get :class:`MigrationError`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILE = re.compile(r"^(?P<version>\d{3,})_(?P<name>[A-Za-z0-9_\-]+)\.sql$")
#: Arbitrary but fixed: every spendgate migration runner takes this advisory lock.
_LOCK_ID = 0x5E9D_6A7E

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    sha256      text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The schema cannot be brought up to date. The operator must look: do not retry blindly."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory``, ordered by version.

    Raises :class:`MigrationError` on a ``.sql`` file not named ``NNN_name.sql`` or on two
    files with the same version.
    """
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name} is not named NNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"migrations {found[version].path.name} and {path.name} share version {version}"
            )
        found[version] = Migration(version, match["name"], path)
    return [found[v] for v in sorted(found)]


def _has_statements(sql: str) -> bool:
    without_block = re.sub(r"/\*.*?\*/", "", sql, flags=re.S)
    without_line = re.sub(r"--[^\n]*", "", without_block)
    return bool(without_line.replace(";", "").strip())


def apply_migrations(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Bring the database at ``database_url`` up to date; return the versions applied now.

    Blocks while another runner holds the lock. Raises :class:`MigrationError` when the
    database is unreachable, a migration fails (its transaction is rolled back; earlier ones
    stay applied) or an applied migration's file changed.
    """
    migrations = discover(directory)
    applied_now: list[int] = []
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
            try:
                conn.execute(_VERSION_TABLE)
                rows = conn.execute("SELECT version, sha256 FROM schema_migrations").fetchall()
                applied = {int(version): str(sha) for version, sha in rows}
                for migration in migrations:
                    if migration.version in applied:
                        if applied[migration.version] != migration.sha256:
                            raise MigrationError(
                                f"migration {migration.path.name} changed after it was applied;"
                                " add a new migration instead of editing it"
                            )
                        continue
                    _apply_one(conn, migration)
                    applied_now.append(migration.version)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    except psycopg.Error as exc:
        raise MigrationError(f"migrating the database failed: {exc}") from exc
    return applied_now


def _apply_one(conn: psycopg.Connection, migration: Migration) -> None:
    sql = migration.sql
    try:
        with conn.transaction():
            if _has_statements(sql):
                conn.execute(sql.encode("utf-8"))  # bytes: no client-side %-placeholders
            conn.execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.sha256),
            )
    except psycopg.Error as exc:
        raise MigrationError(f"migration {migration.path.name} failed: {exc}") from exc


def applied_versions(database_url: str) -> list[int]:
    """Versions recorded in ``schema_migrations`` (empty when the table does not exist)."""
    try:
        with psycopg.connect(database_url, connect_timeout=10) as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
            if exists is None or exists[0] is None:
                return []
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
            return [int(r[0]) for r in rows.fetchall()]
    except psycopg.Error as exc:
        raise MigrationError(f"reading schema_migrations failed: {exc}") from exc
