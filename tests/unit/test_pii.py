"""PII redaction: true positives per type, counts, and the many look-alikes that must stay."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.data.pii import is_iban, is_resident_id, luhn_valid, redact, resident_id_check_digit
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


# --- mainland China -------------------------------------------------------------------------------------------


@st.composite
def resident_ids(draw: st.DrawFn) -> str:
    """A well-formed 18-digit resident ID: region, a real birth date, sequence, GB 11643 check digit."""
    region = draw(st.integers(110000, 829999))
    born = draw(st.dates(min_value=datetime.date(1900, 1, 1), max_value=datetime.date(2025, 12, 31)))
    first17 = f"{region}{born:%Y%m%d}{draw(st.integers(0, 999)):03d}"
    return first17 + resident_id_check_digit(first17)


CJK_CONTEXT = st.sampled_from(["身份证号", "证件号码：", "公民身份号码 ", "他的身份证是", ""])


@settings(max_examples=200, deadline=None)
@given(resident_ids(), CJK_CONTEXT, st.sampled_from(["，", "。", " ", "）", ""]))
def test_valid_resident_ids_are_redacted(rid: str, before: str, after: str) -> None:
    out, counts = redact(f"{before}{rid}{after}", ALL)
    assert out == f"{before}<ID_NUMBER>{after}" and counts == {"cn_resident_id": 1}


@settings(max_examples=200, deadline=None)
@given(resident_ids(), st.integers(1, 10))
def test_a_wrong_check_digit_is_not_a_resident_id(rid: str, shift: int) -> None:
    wrong = rid[:17] + "0123456789X"[("0123456789X".index(rid[17]) + shift) % 11]
    assert not is_resident_id(wrong, "")
    _, counts = redact(f"身份证号{wrong}。", ALL)
    assert "cn_resident_id" not in counts


@settings(max_examples=200, deadline=None)
@given(st.sampled_from("3456789"), st.text("0123456789", min_size=9, max_size=9),
       st.sampled_from(["", "+86 ", "86-", "+86"]), st.booleans(),
       st.sampled_from(["手机", "电话：", "联系方式 ", "mobile: ", "请拨打", "张三（"]))
def test_mainland_mobiles_are_redacted(second: str, rest: str, prefix: str, grouped: bool, before: str) -> None:
    number = f"1{second}{rest}"
    shown = f"{number[:3]}-{number[3:7]}-{number[7:]}" if grouped else number
    out, counts = redact(f"{before}{prefix}{shown}，谢谢", ALL)
    assert out == f"{before}<PHONE>，谢谢" and sum(counts.values()) == 1


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["010", "021", "0755", "0571"]), st.sampled_from("23456789"),
       st.text("0123456789", min_size=7, max_size=7), st.sampled_from(["paren", "fullwidth", "dash"]))
def test_mainland_landlines_are_redacted(area: str, first: str, rest: str, style: str) -> None:
    local = first + rest
    shown = {"paren": f"({area}) {local}", "fullwidth": f"（{area}）{local}", "dash": f"{area}-{local}"}[style]
    out, counts = redact(f"办公电话{shown}。", ALL)
    assert out == "办公电话<PHONE>。" and counts == {"cn_landline": 1}


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**12 - 1), st.sampled_from(["622202", "621700", "625911", "622848"]))
def test_unionpay_cards_with_a_valid_luhn_digit_are_redacted(body: int, bin_: str) -> None:
    first = f"{bin_}{body:012d}"  # 18 digits, then the Luhn digit: a 19-digit mainland debit card
    check = next(d for d in "0123456789" if luhn_valid(first + d))
    out, counts = redact(f"卡号{first}{check}，", ALL)
    assert out == "卡号<ID_NUMBER>，" and counts == {"id_number": 1}
    wrong = next(d for d in "0123456789" if not luhn_valid(first + d))
    assert redact(f"卡号{first}{wrong}，", ALL)[1].get("id_number", 0) == 0


def test_a_bare_eleven_digit_number_in_code_is_not_a_mobile() -> None:
    code = "self.assertEqual(13577625587, f(x))\nlimit = 15000000000\n"
    assert redact(code, ALL) == (code, {})


@pytest.mark.parametrize(("text", "expected"), [
    ("护照号码E12345678，", "护照号码<ID_NUMBER>，"),
    ("Passport No. EA1234567", "Passport No. <ID_NUMBER>"),
    ("护照：G12345678", "护照：<ID_NUMBER>"),
])
def test_passports_after_their_word(text: str, expected: str) -> None:
    assert redact(text, ALL)[0] == expected


@settings(max_examples=200, deadline=None)
@given(resident_ids(), st.sampled_from("3456789"), st.text("0123456789", min_size=9, max_size=9),
       st.sampled_from(["var_", "x", "ID_", "k", "0x", "_"]), st.sampled_from(["_a", "abc", "L", "_1", "x"]))
def test_no_redaction_inside_code_identifiers(rid: str, second: str, rest: str, head: str, tail: str) -> None:
    mobile = f"1{second}{rest}"
    for ident in (f"{head}{rid}{tail}", f"{head}{mobile}{tail}", f"{head}{mobile}", f"{mobile}{tail}",
                  f"{head}E{rest[:8].ljust(8, '0')}"):
        code = f"护照 = {ident}\n{ident} = lookup(user.{ident})\n"
        out, counts = redact(code, ALL)
        assert out == code, (ident, counts)
