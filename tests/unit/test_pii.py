"""PII redaction: true positives per type, counts, and the many look-alikes that must stay."""

from __future__ import annotations

import pytest

from jobs.data.pii import is_iban, luhn_valid, redact
from jobs.recipe import PIIConfig

ALL = PIIConfig()


@pytest.mark.parametrize(("text", "expected", "kind"), [
    ("write to jane.doe+ops@example.co.uk today", "write to <EMAIL> today", "email"),
    ("Author: Guido <guido@python.org>", "Author: Guido <<EMAIL>>", "email"),
    ("admin@corp-mail.example.org.", "<EMAIL>.", "email"),
    ("call +1 415-555-0132 now", "call <PHONE> now", "phone"),
    ("call +44 20 7946 0958", "call <PHONE>", "phone"),
    ("+33 1 23 45 67 89 (Paris)", "<PHONE> (Paris)", "phone"),
    ("tel: +4930123456789", "tel: <PHONE>", "phone"),
    ("office (415) 555-0132", "office <PHONE>", "phone"),
    ("fax 415.555.0132.", "fax <PHONE>.", "phone"),
    ("host 192.168.10.23 is down", "host <IP_ADDRESS> is down", "ip_address"),
    ("from 10.0.0.254:8080", "from <IP_ADDRESS>:8080", "ip_address"),
    ("peer 93.184.216.34.", "peer <IP_ADDRESS>.", "ip_address"),
    ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 <IP_ADDRESS> up", "ip_address"),
    ("[fe80::1ff:fe23:4567:890a]:443", "[<IP_ADDRESS>]:443", "ip_address"),
    ("ssn 123-45-6789", "ssn <ID_NUMBER>", "id_number"),
    ("card 4111 1111 1111 1111 exp", "card <ID_NUMBER> exp", "id_number"),
    ("card 5500-0000-0000-0004", "card <ID_NUMBER>", "id_number"),
    ("amex 3782 822463 10005", "amex <ID_NUMBER>", "id_number"),
    ("number=4111111111111111", "number=<ID_NUMBER>", "id_number"),
    ("IBAN DE89 3704 0044 0532 0130 00", "IBAN <ID_NUMBER>", "id_number"),
    ("IBAN GB82WEST12345698765432.", "IBAN <ID_NUMBER>.", "id_number"),
])
def test_true_positives(text: str, expected: str, kind: str) -> None:
    out, counts = redact(text, ALL)
    assert out == expected
    assert counts == {kind: 1}


MUST_STAY = [
    "python 3.11.7 and numpy 1.26.4",
    "version 1.2.3, 1.2.3.4 and v10.2.0.1; python 2.7.18.1",
    "released on 2024-01-15 at 10:30:00, or 15.01.2024, or 01/15/2024",
    "color = 0xDEADBEEF; mask = 0x7fffffff; sha = 3f786850e387550fdab836ed7e6dc881de23001b",
    "x = 127; y = 65535; timeout_ms = 1700000000000; big = 4503599627370496",
    "port 8080 and pid 12345 and 18446744073709551615",
    "pi = 3.14159265358979323846; gamma = 0.5772156649015329; e = 2.718281828459045",
    "id 550e8400-e29b-41d4-a716-446655440000",
    "4111 1111 1111 1112 fails the Luhn check",
    "1234 5678 9012 3456 7890 1234 5678 is a table of numbers",
    "@property and @functools.cache and user@localhost and x@self.weight",
    "x = a[::2] + b[1:2:3] + c[1::3] + d[:, ::-1]",
    "{1:2, 3:4} and ratio 16:9 and 12:34:56",
    "listen on 127.0.0.1 and 0.0.0.0 and ::1 and ::",
    "netmask 255.255.255.0 and hostmask 0.0.0.255 and network 10.0.0.0",
    "mac 00:1a:2b:3c:4d:5e",
    "ISBN 978-3-16-148410-0 and DOI 10.1000/182",
    "x = y +12345678 - z and n+1 == 2 and a + 1 234 567",
    "range(1000, 2000, 3000) and [100, 200, 300, 400]",
    "phone 123-456-7890 is not a valid NANP number",
    "OID 1.3.6.1.4.1.311 and 2.5.4.3",
    "x = 1e10 + 5e-3 - 1_000_000",
    "pkg@1.2.3 and git tag v1.2.3-rc.1",
]


@pytest.mark.parametrize("text", MUST_STAY)
def test_must_not_redact(text: str) -> None:
    out, counts = redact(text, ALL)
    assert out == text, counts
    assert not counts


def test_counts_per_type_in_one_document() -> None:
    text = ("Contact a@example.com or b@example.org, phone +1 212-555-0190; servers 192.168.1.10 and "
            "2001:db8::42:1; card 4242 4242 4242 4242; version 3.11.7")
    out, counts = redact(text, ALL)
    assert counts == {"email": 2, "phone": 1, "ip_address": 2, "id_number": 1}
    assert out.count("<EMAIL>") == 2 and "3.11.7" in out and "@" not in out


def test_disabled_kinds_are_left_alone() -> None:
    text = "mail a@example.com from 192.168.1.20, ssn 123-45-6789, call +1 415-555-0132"
    out, counts = redact(text, PIIConfig(email=False, phone=False, ip_address=True, id_number=False))
    assert out == "mail a@example.com from <IP_ADDRESS>, ssn 123-45-6789, call +1 415-555-0132"
    assert counts == {"ip_address": 1}


def test_checksums() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert is_iban("DE89370400440532013000") and not is_iban("DE88370400440532013000")
