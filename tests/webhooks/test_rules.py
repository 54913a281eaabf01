"""The pure parts of webhook delivery: signatures, the schedule, Retry-After, targets, matching."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from standardwebhooks import Webhook

from connectors.webhooks import signing
from connectors.webhooks.dispatcher import RETRY_AFTER_MOST, RetrySchedule, retry_after_seconds
from connectors.webhooks.store import matches
from connectors.webhooks.targets import networks, permitted


def test_signatures_are_those_of_the_reference_implementation() -> None:
    secret = signing.new_secret()
    body = '{"id":"ev-1","data":{"title":{"tr":"Mahalle Mutfakları"}}}'.encode()
    timestamp = int(datetime.now(timezone.utc).timestamp())
    expected = Webhook(secret).sign("ev-1", datetime.fromtimestamp(timestamp, timezone.utc), body.decode())
    assert signing.sign(secret, "ev-1", timestamp, body) == expected
    other = signing.new_secret()
    header = signing.signature_header([secret, other], "ev-1", timestamp, body)
    headers = {"webhook-id": "ev-1", "webhook-timestamp": str(timestamp), "webhook-signature": header}
    assert Webhook(secret).verify(body, headers) == Webhook(other).verify(body, headers)


def test_the_schedule_jitters_all_but_the_first_attempt() -> None:
    schedule = RetrySchedule((0, 5, 300))
    assert schedule.first() == timedelta(0) and schedule.attempts == 3
    delays = [schedule.after(1) for _ in range(500)]
    assert all(4.0 <= d <= 6.0 for d in delays if d is not None) and len(set(delays)) > 100
    assert 240 <= (schedule.after(2) or 0) <= 360
    assert schedule.after(3) is None


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds(format_datetime(now + timedelta(minutes=2), usegmt=True), now) == 120
    assert retry_after_seconds(format_datetime(now - timedelta(minutes=2), usegmt=True), now) == 0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None
    assert retry_after_seconds("99999999999999", now) == RETRY_AFTER_MOST  # a day at most
    assert retry_after_seconds(format_datetime(now + timedelta(days=400), usegmt=True), now) == RETRY_AFTER_MOST


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True), ("2606:2800:220:1::1", True),
        ("127.0.0.1", False), ("10.0.0.8", False), ("172.16.3.4", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("240.0.0.1", False),
        ("224.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ],
)
def test_only_public_addresses_are_permitted_by_default(address: str, allowed: bool) -> None:
    assert permitted(ipaddress.ip_address(address), []) is allowed


def test_allowed_networks_let_private_addresses_through() -> None:
    allow = networks(["127.0.0.0/8", "10.1.0.0/16"])
    assert permitted(ipaddress.ip_address("127.0.0.1"), allow) and permitted(ipaddress.ip_address("::ffff:127.0.0.1"), allow)
    assert permitted(ipaddress.ip_address("10.1.2.3"), allow) and not permitted(ipaddress.ip_address("10.2.0.1"), allow)
    assert not permitted(ipaddress.ip_address("::1"), allow)


def test_event_types_match_by_type_or_domain() -> None:
    assert matches([], "call.published")
    assert matches(["project.*"], "project.registered") and not matches(["project.*"], "projects.x")
    assert matches(["call.published", "project.*"], "call.published") and not matches(["call.published"], "call.closed")
