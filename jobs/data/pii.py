"""PII redaction: e-mail, phone numbers, IP addresses and ID/card numbers become typed placeholders."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from jobs.recipe import PIIConfig

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# International (+CC ...) or North-American style numbers with separators; bare digit runs are not phones.
PHONE = re.compile(
    r"(?<![\w.+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\b\d{3}[.-]\d{3}[.-]\d{4})(?!\w|\.\d)"
)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "id_number": "<ID_NUMBER>"}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that payment card numbers carry."""
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_like(candidate: str) -> bool:
    """Payment-card shaped: an issuer prefix (3-6: Amex, Visa, Mastercard, Discover...) and a valid Luhn sum."""
    digits = re.sub(r"\D", "", candidate)
    return digits[0] in "3456" and luhn_valid(digits)


def _is_ip(candidate: str, version: int) -> bool:
    try:
        addr = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if version == 4:
        # Version strings like 1.2.3.4 are legal addresses too: require a non-trivial first octet pattern.
        octets = candidate.split(".")
        return not all(len(o) == 1 for o in octets) and addr.version == 4
    # Slices like a[::2] parse as IPv6: ask for at least three groups, as written addresses have.
    return addr.version == 6 and sum(1 for g in candidate.split(":") if g) >= 3


def redact(text: str, cfg: PIIConfig) -> tuple[str, Counter[str]]:
    """Replace each enabled kind of PII by its placeholder; count replacements per kind."""
    counts: Counter[str] = Counter()

    def sub(pattern: re.Pattern[str], kind: str, text: str, accept=lambda m: True) -> str:
        def repl(m: re.Match[str]) -> str:
            if not accept(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        return pattern.sub(repl, text)

    if cfg.email:
        text = sub(EMAIL, "email", text)
    if cfg.ip_address:
        text = sub(IPV4, "ip_address", text, lambda s: _is_ip(s, 4))
        text = sub(IPV6, "ip_address", text, lambda s: _is_ip(s, 6))
    if cfg.id_number:
        text = sub(SSN, "id_number", text)
        text = sub(CARD, "id_number", text, _card_like)
    if cfg.phone:
        text = sub(PHONE, "phone", text)
    return text, counts
