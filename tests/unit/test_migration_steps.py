"""How migrations are written for a live database (consumer/migrate.py), checked on the files.

The released migrations (0001-0003) keep their meaning: each is one transaction. From
version 4 on, what would hold a table's lock for long is refused here: a CHECK added
without NOT VALID (validated under the lock), an index built without CONCURRENTLY, an
UPDATE of existing rows outside a batched step.
"""

from __future__ import annotations

import re

import pytest

from intentflow.consumer.migrate import Migration, StepKind, available

RELEASED = 3  # applied on real databases: never restructured


def test_the_released_migrations_are_one_transaction_each() -> None:
    for migration in available()[:RELEASED]:
        assert [s.kind for s in migration.steps] == [StepKind.TRANSACTION], migration.name


@pytest.mark.parametrize(
    "migration", [m for m in available() if m.version > RELEASED], ids=lambda m: m.name
)
def test_a_new_migration_holds_no_lock_for_long(migration: Migration) -> None:
    for step in migration.steps:
        code = re.sub(r"--[^\n]*", "", step.sql)
        where = f"{migration.version:04d}_{migration.name}.sql:{step.line}"
        if step.kind is StepKind.TRANSACTION:
            for check in re.findall(r"ADD CONSTRAINT\s+\w+\s+CHECK\b.*?;", code, re.S):
                assert check.rstrip(";").rstrip().endswith("NOT VALID"), (where, check)
            assert not re.search(r"\bCREATE\s+(UNIQUE\s+)?INDEX\b", code), where
            assert not re.search(r"^\s*UPDATE\b", code, re.M), where
        if step.kind is StepKind.OUTSIDE_A_TRANSACTION:
            assert "IF NOT EXISTS" in code, where  # safe to run again
        if step.kind is StepKind.IN_BATCHES:
            assert "$1" in code, where  # where the last batch ended


def test_a_step_of_a_kind_nobody_knows_is_refused_with_its_file() -> None:
    bad = Migration(9, "bad", "SELECT 1;\n-- step: sometimes\nSELECT 2;\n")
    with pytest.raises(ValueError, match=r"0009_bad\.sql: unknown step kind 'sometimes'"):
        _ = bad.steps


def test_a_step_outside_a_transaction_is_one_statement() -> None:
    two = Migration(9, "two", "-- step: outside a transaction\nSELECT 1; SELECT 2;\n")
    with pytest.raises(ValueError, match=r"0009_two\.sql:1: a step outside a transaction is one"):
        _ = two.steps
    commented = Migration(
        9, "ok", "-- step: in batches\n-- a comment; with a semicolon\nSELECT $1;\n"
    )
    assert [s.kind for s in commented.steps] == [StepKind.IN_BATCHES]
