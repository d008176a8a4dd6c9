"""The migration runner's rules about files (no database needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spendgate.store.migrate import MIGRATIONS_DIR, MigrationError, discover


def test_shipped_migrations_are_well_named_and_start_at_000() -> None:
    migrations = discover(MIGRATIONS_DIR)
    assert migrations[0].version == 0
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})


def test_migrations_are_ordered_by_number_not_by_name(tmp_path: Path) -> None:
    for name in ("010_z.sql", "002_b.sql", "001_c.sql"):
        (tmp_path / name).write_text("SELECT 1;")
    assert [m.version for m in discover(tmp_path)] == [1, 2, 10]


def test_two_files_with_one_version_are_refused(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("")
    (tmp_path / "001_b.sql").write_text("")
    with pytest.raises(MigrationError, match="share version 1"):
        discover(tmp_path)


def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("")
    with pytest.raises(MigrationError, match="NNN_name.sql"):
        discover(tmp_path)
