"""The API alone chooses HTTP statuses: every failure the rules and the store raise has one."""

from __future__ import annotations

import pytest

from spendgate.api.errors import ApiError, NotYetVisible, Unauthorized, status_of
from spendgate.domain import errors as domain_errors
from spendgate.domain.errors import Conflict, Failure, Forbidden, NotFound, Unprocessable
from spendgate.store import errors as store_errors
from spendgate.store.errors import DatabaseUnavailable, StoreError


def _failures() -> list[type[Failure]]:
    found = []
    for module in (domain_errors, store_errors):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Failure) and value is not Failure:
                found.append(value)
    return found


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (Forbidden("no"), 403, "forbidden"),
        (Forbidden("no", code="team_mismatch"), 403, "team_mismatch"),
        (NotFound("gone"), 404, "not_found"),
        (Conflict("busy"), 409, "conflict"),
        (Unprocessable("bad", details={"field": "limit"}), 422, "invalid"),
        (DatabaseUnavailable(), 503, "database_unavailable"),
        (StoreError("boom"), 500, "store_error"),
        (Unauthorized(), 401, "unauthorized"),
        (NotYetVisible(7), 503, "not_yet_visible"),
    ],
)
def test_each_failure_has_its_status_and_code(failure: Failure, status: int, code: str) -> None:
    assert status_of(failure)[0] == status and failure.code == code


def test_every_rule_and_store_failure_is_mapped_not_left_to_the_500_default() -> None:
    unmapped = [f.__name__ for f in _failures() if f is not StoreError and status_of(f("x"))[0] == 500]
    assert unmapped == []
    assert {f.__name__ for f in _failures()} >= {"NotFound", "Conflict", "Forbidden", "Unprocessable"}


def test_retry_after_only_where_a_retry_can_help() -> None:
    assert status_of(DatabaseUnavailable())[1] == {"Retry-After": "1"}
    assert status_of(Conflict("x"))[1] == {}
    assert status_of(NotYetVisible(3))[1]["Spendgate-Version"] == "3"
    assert issubclass(ApiError, Failure)  # one handler serves both
