"""How statuses are read (DIMSE and STOW-RS) and the retry policy's backoff."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.config import ExportSettings
from gateway.errors import one_line
from gateway.export.outcome import Item, Kind, RetryPolicy, dimse_outcome
from gateway.export.stow import stow_outcomes


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, Kind.DELIVERED),
        (0xB000, Kind.WARNING),
        (0xB007, Kind.WARNING),
        (0x0001, Kind.WARNING),
        (0xA700, Kind.RETRY),
        (0xA7FF, Kind.RETRY),
        (0x0213, Kind.RETRY),
        (0xA900, Kind.DEAD),
        (0xC000, Kind.DEAD),
        (0xC123, Kind.DEAD),
        (0x0122, Kind.REFUSED),
        (0x0124, Kind.DEAD),
        (0x0110, Kind.DEAD),
    ],
)
def test_dimse_status(status: int, kind: Kind) -> None:
    outcome = dimse_outcome(status, "comment")
    assert outcome.kind is kind and outcome.status == status
    assert outcome.delivered == (kind in (Kind.DELIVERED, Kind.WARNING))
    if kind is not Kind.DELIVERED:
        assert f"0x{status:04X}: comment" in outcome.reason


def test_sop_class_not_supported_names_the_class() -> None:
    outcome = dimse_outcome(0x0122, sop_class_uid="1.2.840.10008.5.1.4.1.1.11.1")
    assert outcome.kind is Kind.REFUSED and not outcome.delivered
    assert outcome.reason == (
        "SOP class 1.2.840.10008.5.1.4.1.1.11.1 (Grayscale Softcopy Presentation State Storage) not supported, "
        "status 0x0122"
    )
    assert dimse_outcome(0x0122, sop_class_uid="1.2.3.4").reason == "SOP class 1.2.3.4 not supported, status 0x0122"


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=8, backoff_initial_s=2, backoff_max_s=300)
    rng = random.Random(1)
    for attempts, ceiling in [(1, 2), (2, 4), (3, 8), (8, 256), (9, 300), (50, 300), (10_000, 300)]:
        delays = [policy.delay_s(attempts, rng.random()) for _ in range(200)]
        assert all(ceiling / 2 <= d < ceiling for d in delays), (attempts, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling / 10, "jitter spreads the retries"
    assert policy.delay_s(3, 0.0) == 4.0 and policy.delay_s(3, 0.5) == 6.0


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="backoff_initial_s"):
        RetryPolicy(backoff_initial_s=10, backoff_max_s=1)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy().delay_s(1, 1.0)


def _items(*uids: str) -> list[Item]:
    return [
        Item(k, 1, Path(f"{k}.dcm"), "1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1")
        for k, uid in enumerate(uids)
    ]


def _seq(tag: str, entries: list[tuple[str, int | None]], reason_tag: str) -> dict:
    items = []
    for uid, reason in entries:
        item = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item[reason_tag] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {tag: {"vr": "SQ", "Value": items}}


def test_stow_200_delivers_everything_with_warnings_recorded() -> None:
    answer = _seq("00081199", [("1.1", None), ("1.2", 0xB000)], "00081196")
    first, second = stow_outcomes(200, answer, _items("1.1", "1.2"))
    assert first.kind is Kind.DELIVERED and second.kind is Kind.WARNING and "0xB000" in second.reason


def test_stow_202_reads_each_instance() -> None:
    answer = {
        **_seq("00081199", [("1.1", None)], "00081196"),
        **_seq("00081198", [("1.2", 0xA700), ("1.3", 0xC000), ("1.4", None)], "00081197"),
    }
    outcomes = stow_outcomes(202, answer, _items("1.1", "1.2", "1.3", "1.4", "1.5"))
    assert [o.kind for o in outcomes] == [Kind.DELIVERED, Kind.RETRY, Kind.DEAD, Kind.DEAD, Kind.RETRY]
    assert "FailureReason 0xC000" in outcomes[2].reason
    assert "without this instance" in outcomes[4].reason


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, Kind.DEAD),
        (401, Kind.DEAD),
        (409, Kind.DEAD),
        (415, Kind.DEAD),
        (429, Kind.RETRY),
        (500, Kind.RETRY),
        (503, Kind.RETRY),
    ],
)
def test_stow_http_status(status: int, kind: Kind) -> None:
    (outcome,) = stow_outcomes(status, {}, _items("1.1"))
    assert outcome.kind is kind and outcome.status == status and f"HTTP {status}" in outcome.reason


def test_stow_sop_class_not_supported_is_refused_and_not_authorized_is_dead() -> None:
    answer = {
        **_seq("00081199", [("1.1", None)], "00081196"),
        **_seq("00081198", [("1.2", 0x0122), ("1.3", 0x0124)], "00081197"),
    }
    delivered, refused, unauthorized = stow_outcomes(202, answer, _items("1.1", "1.2", "1.3"))
    assert (delivered.kind, refused.kind, unauthorized.kind) == (Kind.DELIVERED, Kind.REFUSED, Kind.DEAD)
    assert refused.reason == "SOP class 1.2.840.10008.5.1.4.1.1.2 (CT Image Storage) not supported, HTTP 202, " + (
        "FailureReason 0x0122"
    )
    assert unauthorized.reason == "rejected, HTTP 202, FailureReason 0x0124"
    (alone,) = stow_outcomes(409, _seq("00081198", [("1.1", 0x0122)], "00081197"), _items("1.1"))
    assert alone.kind is Kind.REFUSED and alone.status == 409


def test_stow_409_with_an_out_of_resources_reason_is_retried() -> None:
    answer = _seq("00081198", [("1.1", 0xA700), ("1.2", 0xA900)], "00081197")
    outcomes = stow_outcomes(409, answer, _items("1.1", "1.2"))
    assert [o.kind for o in outcomes] == [Kind.RETRY, Kind.DEAD]


def test_stow_answer_that_is_not_dicom_json_is_tolerated() -> None:
    odd = {"00081198": {"vr": "SQ", "Value": ["not an item", {"00081155": {"Value": [7]}}]}, "x": 1}
    (outcome,) = stow_outcomes(202, odd, _items("1.1"))
    assert outcome.kind is Kind.RETRY


def test_policy_gives_up_after_a_duration_and_optionally_a_count() -> None:
    policy = RetryPolicy(backoff_initial_s=2, backoff_max_s=600, give_up_after_s=86400)
    assert policy.max_attempts is None
    assert policy.gives_up(1000, first_attempt_at=0, now=86399) is None, "no count limit by default"
    assert policy.gives_up(150, first_attempt_at=0, now=86400) == "gave up after 24.0 h and 150 attempts"
    assert RetryPolicy(max_attempts=3).gives_up(3, first_attempt_at=0, now=1) == "gave up after 3 attempts"
    assert RetryPolicy(give_up_after_s=90).gives_up(2, 0, 90) == "gave up after 90 s and 2 attempts"
    assert policy.next_attempt_at(20, 0.5, first_attempt_at=0, start=1000) == 1000 + 450
    assert policy.next_attempt_at(20, 0.5, first_attempt_at=0, start=86000) == 86400, "cut short to the deadline"
    with pytest.raises(ValueError, match="give_up_after_s"):
        RetryPolicy(give_up_after_s=0)


def test_policy_of_the_settings() -> None:
    assert RetryPolicy.from_settings(ExportSettings()) == RetryPolicy(None, 2.0, 600.0, 86400.0)
    values = {"max_attempts": 5, "backoff_initial_s": 1, "backoff_max_s": 60, "give_up_after_s": 3600}
    assert RetryPolicy.from_settings(ExportSettings(**values)) == RetryPolicy(5, 1.0, 60.0, 3600.0)


def test_one_line_reasons() -> None:
    assert one_line("a\n  b\tc \r\n") == "a b c"
    assert one_line("x" * 600) == "x" * 499 + "…" and len(one_line("y" * 50, 10)) == 10
