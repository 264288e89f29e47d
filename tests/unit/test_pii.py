"""PII redaction: true positives per type, and things that must stay."""

from __future__ import annotations

import pytest

from jobs.data.pii import luhn_valid, redact
from jobs.recipe import PIIConfig

ALL = PIIConfig()


@pytest.mark.parametrize(("text", "expected", "kind"), [
    ("write to jane.doe+ops@example.co.uk today", "write to <EMAIL> today", "email"),
    ("admin@corp-mail.example.org", "<EMAIL>", "email"),
    ("call +1 415-555-0132 now", "call <PHONE> now", "phone"),
    ("call +44 20 7946 0958", "call <PHONE>", "phone"),
    ("office (415) 555-0132", "office <PHONE>", "phone"),
    ("fax 415.555.0132", "fax <PHONE>", "phone"),
    ("host 192.168.10.23 is down", "host <IP_ADDRESS> is down", "ip_address"),
    ("from 10.0.0.254:8080", "from <IP_ADDRESS>:8080", "ip_address"),
    ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 <IP_ADDRESS> up", "ip_address"),
    ("ssn 123-45-6789", "ssn <ID_NUMBER>", "id_number"),
    ("card 4111 1111 1111 1111 exp", "card <ID_NUMBER> exp", "id_number"),
    ("card 5500-0000-0000-0004", "card <ID_NUMBER>", "id_number"),
])
def test_true_positives(text: str, expected: str, kind: str) -> None:
    out, counts = redact(text, ALL)
    assert out == expected
    assert counts[kind] == 1


@pytest.mark.parametrize("text", [
    "python 3.11.7 and numpy 1.26.4",
    "version 1.2.3.4 of the library",
    "x = a[::2] + b[1:2:3]",
    "color = 0xDEADBEEF",
    "released on 2024-01-15 at 10:30:00",
    "timeout_ms = 1700000000000",
    "port 8080 and pid 12345",
    "id 550e8400-e29b-41d4-a716-446655440000",
    "4111 1111 1111 1112 fails the Luhn check",
    "decorator @property and user@localhost",
    "ratio 3.14159 and 2.71828",
])
def test_must_not_redact(text: str) -> None:
    out, counts = redact(text, ALL)
    assert out == text, counts


def test_disabled_kinds_are_left_alone() -> None:
    text = "mail a@example.com from 192.168.1.20"
    out, counts = redact(text, PIIConfig(email=False, phone=False, ip_address=True, id_number=False))
    assert out == "mail a@example.com from <IP_ADDRESS>" and counts == {"ip_address": 1}


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
