"""The operator's one liveness Lease: what a renewal writes, and that however many timers
ask, it is written once per leaseSeconds/3 (retried soon after a failure, never raised)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from edpilot_operator.liveness import LeaseKeeper, lease_body, lease_spec, micro_time
from edpilot_operator.main import parse_args

from edpilot.models import LeaseRef

REF = LeaseRef(namespace="edpilot-system", name="rel-edpilot-operator")
NOW = datetime(2026, 12, 6, 20, 22, 12, 123456, tzinfo=UTC)


def test_a_renewal_writes_holder_duration_and_micro_time() -> None:
    assert micro_time(NOW) == "2026-12-06T20:22:12.123456Z"
    assert micro_time(NOW.astimezone(timezone(timedelta(hours=2)))) == micro_time(NOW)  # always UTC
    assert lease_spec("op-0", 60, NOW) == {
        "holderIdentity": "op-0",
        "leaseDurationSeconds": 60,
        "renewTime": "2026-12-06T20:22:12.123456Z",
    }
    body = lease_body(REF, "op-0", 60, NOW)
    assert body["metadata"]["namespace"] == REF.namespace and body["metadata"]["name"] == REF.name
    assert body["spec"]["acquireTime"] == body["spec"]["renewTime"]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_many_timers_renew_once_per_third_of_the_lease() -> None:
    clock, writes = Clock(), []
    keeper = LeaseKeeper(REF, "op-0", 60, lambda *args: writes.append(args), clock)
    # 2,000 timers every 5 s for 3 minutes: 9 renewals (one per 20 s), not 72,000.
    for step in range(36):
        clock.t = 100.0 + 5 * step
        for _ in range(2000):
            keeper.renew_if_due(NOW + timedelta(seconds=5 * step))
    assert len(writes) == 9 and keeper.renewals == 9
    assert [w[3] for w in writes] == [NOW + timedelta(seconds=20 * k) for k in range(9)]
    assert {w[:3] for w in writes} == {(REF, "op-0", 60)}


def test_a_failed_renewal_is_retried_by_a_later_timer_and_never_raises() -> None:
    clock, calls = Clock(), []

    def renew(*args: object) -> None:
        calls.append(args)
        if len(calls) <= 2:
            raise OSError("connection refused")

    keeper = LeaseKeeper(REF, "op-0", 60, renew, clock, retry_seconds=2)
    assert keeper.renew_if_due(NOW) is False
    assert keeper.renew_if_due(NOW) is False and len(calls) == 1  # not before the retry delay
    clock.t += 2
    assert keeper.renew_if_due(NOW) is False and len(calls) == 2
    clock.t += 2
    assert keeper.renew_if_due(NOW) is True and keeper.failures == 2 and keeper.renewals == 1


def test_concurrent_timers_write_once() -> None:
    clock, writes = Clock(), []
    gate = threading.Event()

    def slow(*args: object) -> None:
        writes.append(args)
        gate.wait(5)

    keeper = LeaseKeeper(REF, "op-0", 60, slow, clock)
    threads = [threading.Thread(target=keeper.renew_if_due, args=(NOW,)) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(writes) == 1


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, [], ("default", "edpilot-operator")),
        ({"POD_NAMESPACE": "edpilot-system"}, [], ("edpilot-system", "edpilot-operator")),
        ({"POD_NAMESPACE": "x"}, ["--lease-namespace=y", "--lease-name=rel-op"], ("y", "rel-op")),
    ],
)
def test_the_lease_is_named_by_flags_in_the_pods_namespace(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], expected: tuple[str, str]
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = parse_args(argv)
    assert (args.lease_namespace, args.lease_name) == expected
