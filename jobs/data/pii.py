"""PII redaction: e-mail addresses, phone numbers, IP addresses and ID/card numbers become typed placeholders.

Each kind is a regular expression that proposes candidates and a validator that rejects look-alikes, so that
code and prose keep their version numbers (3.11.7), dates, times, hex constants, slices and ordinary integers:

- e-mail: `local@domain.tld` where the TLD is a country code or a common generic one (`x@self.weight` is code);
- phone: international `+CC ...` with separators (8-15 digits, E.164; a bare `+digits` run only after "tel",
  "phone", "call"...) or North-American `(NXX) NXX-XXXX` by the NANP rules;
- IP: valid IPv4 (not all one-digit octets like 1.2.3.4, not after "version"/"v") and IPv6 with three or more
  groups; loopback, unspecified, multicast, network (x.x.x.0) addresses and netmasks identify nobody and stay;
- ID: US SSN (not 000/666/9xx area, 00 group, 0000 serial), payment cards (issuer prefix and length, Luhn
  checksum, one kind of separator; UnionPay's 62 covers mainland bank cards) and IBANs (ISO 13616 mod-97);
- mainland China: mobile numbers (1[3-9]x, 11 digits, optionally +86/86 and 3-4-4 groups; a bare 11-digit
  run only after Chinese text or a word like "mobile"), landlines with
  their area code ((010) 12345678, 0755-12345678), the 18-digit resident ID (GB 11643: a valid birth date
  and the ISO 7064 MOD 11-2 check digit; a wrong check digit is not an ID) and passports (E/G + 8 digits or
  E + letter + 7 digits, only after a word like 护照 or passport: the bare shape is too common in code).

Chinese is written without spaces, so a number sits right after a Han character (电话13812345678). The
patterns run on a view of the text in which every Han/kana character is a space (same length, same
offsets), so their boundaries work as they do in spaced text; replacements are made in the text itself.
The count of each replacement is kept under its rule's label (the kind, or e.g. cn_resident_id).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from jobs.recipe import PIIConfig

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "id_number": "<ID_NUMBER>"}

GENERIC_TLDS = frozenset({
    "com", "net", "org", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "io", "ai", "app", "dev", "xyz",
    "online", "site", "tech", "cloud", "email", "mail", "museum", "aero", "coop", "jobs", "travel", "mobi", "asia",
    "tel", "cat", "post", "global", "solutions", "company", "agency", "digital", "network", "systems"
})
_VERSION_BEFORE = re.compile(r"(?i)(?:\bversion|\bver\.?|\brelease|\bpython|\bv)\s*$")
_PHONE_BEFORE = re.compile(r"(?i)(?:tel|phone|call|mobile|cell|fax|whatsapp|sms|手机|电话|電話|手機)\W{0,3}$")
_NETMASK_OCTETS = {"0", "128", "192", "224", "240", "248", "252", "254", "255"}
_PASSPORT_BEFORE = re.compile(r"(?i)(?:passport|护照|護照)\s*(?:no\.?|number|号码?|號碼?)?\s*[:：#]?\s*$")
_RESIDENT_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_RESIDENT_ID_CHECK = "10X98765432"


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that payment card numbers carry."""
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_issuer_ok(digits: str) -> bool:
    """Issuer prefix and length of Visa, Mastercard, Amex, Discover, JCB, Diners and UnionPay numbers."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    return ((digits[0] == "4" and n in (13, 16, 19))
            or ((51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16)
            or (p2 in (34, 37) and n == 15)
            or ((p4 == 6011 or p2 == 65 or 644 <= int(digits[:3]) <= 649) and 16 <= n <= 19)
            or (3528 <= p4 <= 3589 and 16 <= n <= 19)
            or ((p2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305) and 14 <= n <= 19)
            or (p2 == 62 and 16 <= n <= 19))


def _card_layout_ok(candidate: str) -> bool:
    """No separators, or one kind of separator in groups of four (4-6-5 / 4-6-4 for Amex and Diners)."""
    groups = re.split(r"[ -]", candidate)
    if len(groups) == 1:
        return True
    sizes = [len(g) for g in groups]
    return (len(set(re.sub(r"\d", "", candidate))) == 1
            and (sizes in ([4, 6, 5], [4, 6, 4]) or (all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4)))


def is_card_number(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return (_card_layout_ok(candidate) and len(set(digits)) > 1 and _card_issuer_ok(digits)
            and luhn_valid(digits))


def is_iban(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, the whole mod 97 is 1."""
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def is_email(candidate: str) -> bool:
    tld = candidate.rsplit(".", 1)[-1].lower()
    return len(tld) == 2 or tld in GENERIC_TLDS


def is_phone(candidate: str, before: str) -> bool:
    """8-15 digits after +CC (a bare +digits run only after a word like "tel"), or exactly ten (NANP)."""
    digits = sum(c.isdigit() for c in candidate)
    if not candidate.startswith("+"):
        return digits == 10
    if candidate[1:].isdigit() and not _PHONE_BEFORE.search(before):
        return False  # +4294967296 in code is a number, not a phone
    return 8 <= digits <= 15


def is_ipv4(candidate: str, before: str) -> bool:
    octets = candidate.split(".")
    if all(len(o) == 1 for o in octets) or _VERSION_BEFORE.search(before):
        return False
    try:
        addr = ipaddress.IPv4Address(candidate)  # rejects octets above 255 and leading zeros
    except ValueError:
        return False
    netmask = octets[0] == "255" and set(octets) <= _NETMASK_OCTETS
    hostmask = octets[0] == "0"  # 0.0.0.255 and the "this network" block 0/8
    return not (addr.is_loopback or addr.is_multicast or netmask or hostmask or octets[3] == "0")


def is_ipv6(candidate: str, before: str) -> bool:
    if candidate.count(":") < 2:
        return False
    try:
        addr = ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = [g for g in candidate.split(":") if g]
    return len(groups) >= 3 and not (addr.is_loopback or addr.is_unspecified or addr.is_multicast)


def is_ssn(candidate: str, before: str) -> bool:
    """US SSN rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = candidate.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def resident_id_check_digit(first17: str) -> str:
    """GB 11643-1999 check digit (ISO 7064 MOD 11-2) of the first 17 digits of a resident ID."""
    return _RESIDENT_ID_CHECK[sum(int(d) * w for d, w in zip(first17, _RESIDENT_ID_WEIGHTS, strict=True)) % 11]


def is_resident_id(candidate: str, before: str) -> bool:
    """18 characters: region (first digit 1-8), a real birth date from 1900 on, sequence, correct check digit."""
    import datetime

    if len(candidate) != 18 or not candidate[:17].isdigit():
        return False
    try:
        born = datetime.date(int(candidate[6:10]), int(candidate[10:12]), int(candidate[12:14]))
    except ValueError:
        return False
    return born.year >= 1900 and resident_id_check_digit(candidate[:17]) == candidate[17].upper()


def is_cn_mobile(candidate: str, before: str) -> bool:
    """11 digits 1[3-9]xxxxxxxxx after an optional 86 country code, in one block or 3-4-4 groups.

    A bare 11-digit run counts only after Chinese text or a word like "mobile": in code it is a number.
    """
    from jobs.data.language import UNSPACED

    digits = re.sub(r"\D", "", candidate)
    if digits.startswith("86") and len(digits) == 13:
        digits = digits[2:]
    bare = candidate.isdigit() and len(candidate) == 11
    if bare and not (UNSPACED.search(before) or _PHONE_BEFORE.search(before)):
        return False
    return len(digits) == 11 and digits[0] == "1" and digits[1] in "3456789"


def is_cn_landline(candidate: str, before: str) -> bool:
    """Area code 010 or 02x (3 digits) or 0[3-9]xx (4 digits), then a 7-8 digit local number."""
    area = re.match(r"[(（]?(0\d+)", candidate).group(1)
    return len(area) == (3 if area[1] in "12" else 4)


def is_cn_passport(candidate: str, before: str) -> bool:
    return _PASSPORT_BEFORE.search(before) is not None


@dataclass(frozen=True)
class Rule:
    """One kind of PII: a pattern proposing candidates, a validator (candidate, text before it) -> bool, and a
    substring without which the text cannot match (a cheap skip)."""

    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str, str], bool]
    needle: str = ""
    label: str = ""  # the name it is counted under; the kind when empty


# Every pattern consumes its first character before looking behind (`X(?<![\w.]X)`): the regex engine then
# scans for that character instead of trying the look-behind at every position, several times faster.
RULES: tuple[Rule, ...] = (
    Rule("id_number", re.compile(r"[1-8](?<![\w.,+-].)\d{5}(?:18|19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                                 r"\d{3}[\dXx](?![\w-]|[.,]\d)"), is_resident_id, label="cn_resident_id"),
    Rule("id_number", re.compile(r"[EGeg](?<![\w-].)(?:\d{8}|[A-HJ-NP-Za-hj-np-z]\d{7})(?![\w-])"), is_cn_passport,
         label="cn_passport"),
    Rule("phone", re.compile(r"(?:\+|(?<![\w.+-]))86[ -]?1[3-9]\d(?:[ -]?\d{4}){2}(?![\w-]|[.,]\d)"), is_cn_mobile,
         "86", label="cn_mobile"),
    Rule("phone", re.compile(r"1(?<![\w.,+-].)[3-9]\d(?:\d{8}|[ -]\d{4}[ -]\d{4})(?![\w-]|[.,]\d)"), is_cn_mobile,
         label="cn_mobile"),
    Rule("phone", re.compile(r"[(（0](?<![\w.,+-].)(?:(?<=[(（])0\d{2,3}[)）] ?|(?<=0)\d{2,3}-)[2-9]\d{6,7}(?:-\d{1,6})?"
                             r"(?![\w-]|[.,]\d)"), is_cn_landline, label="cn_landline"),
    Rule("email", re.compile(
        r"[A-Za-z0-9](?<![\w.%+-].)[A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
        r"(?![\w@-])"), lambda c, b: is_email(c), "@"),
    Rule("ip_address", re.compile(r"\d(?<![\w.].)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)"), is_ipv4, "."),
    Rule("ip_address", re.compile(r"[0-9A-Fa-f:](?<![\w:.].)[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]{1,38}(?![\w:.])"),
         is_ipv6, ":"),
    Rule("id_number", re.compile(r"\d(?<![\w.,-].)\d\d-\d\d-\d{4}(?![\w-]|[.,]\d)"), is_ssn, "-"),
    Rule("id_number", re.compile(r"\d(?<![\w.,+-].)(?<!\d .)(?:[ -]?\d){12,18}(?![\w-]|[.,]\d| \d)"),
         lambda c, b: is_card_number(c)),
    Rule("id_number", re.compile(r"[A-Z](?<![\w-].)[A-Z]\d\d(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w-])"),
         lambda c, b: is_iban(c)),
    Rule("phone", re.compile(r"\+(?<![\w.+-].)[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]\d{1,8}){1,5}(?![\w-]|\.\d)"
                             r"|\+(?<![\w.+-].)[1-9]\d{9,14}(?![\w.-])"), is_phone, "+"),
    Rule("phone", re.compile(r"\((?<![\w.+-].)[2-9]\d\d\) ?[2-9]\d\d[.-]\d{4}(?![\w-]|\.\d)"), is_phone, "("),
    Rule("phone", re.compile(r"[2-9](?<![\w.+-].)\d\d([.-])[2-9]\d\d\1\d{4}(?![\w-]|\.\d)"), is_phone),
)


def redact(text: str, cfg: PIIConfig) -> tuple[str, Counter[str]]:
    """Replace each enabled kind of PII by its placeholder; count the replacements per rule label."""
    from jobs.data.language import UNSPACED, blank_unspaced

    counts: Counter[str] = Counter()
    enabled = {kind for kind in PLACEHOLDERS if getattr(cfg, kind)}
    unspaced = UNSPACED.search(text) is not None
    view = blank_unspaced(text) if unspaced else text
    for rule in RULES:
        if rule.kind in enabled and rule.needle in view:
            redacted = _apply(rule, text, view, counts)
            if redacted is not text:
                text = redacted
                view = blank_unspaced(text) if unspaced else text
    return text, counts


def _apply(rule: Rule, text: str, view: str, counts: Counter[str]) -> str:
    """Replace the rule's valid matches, found in `view`, at the same offsets of `text`."""
    out, last = [], 0
    for m in rule.pattern.finditer(view):
        candidate = text[m.start():m.end()]
        if not rule.valid(candidate, text[max(0, m.start() - 16):m.start()]):
            continue
        counts[rule.label or rule.kind] += 1
        out += [text[last:m.start()], PLACEHOLDERS[rule.kind]]
        last = m.end()
    return "".join(out) + text[last:] if out else text
