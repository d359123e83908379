"""Policy terms in text: "a 90-day return window" -> ("return_window", "90 days").

The observation step of the support loop runs this over every reply (what the model told the
customer) and over the policy passages it retrieved, so both sides of the `grounded_terms`
invariant are the same kind of thing: key -> canonical value. Regular expressions, no model:
the same text always gives the same terms, and a table of sentences tests it.

Keys (TERM_KEYS): return_window, damage_report_window, refund_time, restocking_fee,
return_shipping_fee, fee (a fee of no known kind), refund_method. Values are canonical:
"30 days", "10 business days", "15%", "$7.50", "original payment method", so "a thirty-day
window", "30 days" and "30-day" are one value. What the customer did ("bought 12 days ago")
is not a term: a duration followed by "ago" is skipped, and so is a term in a negated clause
("we cannot refund to a different card").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TERM_KEYS = (
    "return_window",
    "damage_report_window",
    "refund_time",
    "restocking_fee",
    "return_shipping_fee",
    "fee",
    "refund_method",
)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_WORD_VALUES = {w: i for i, w in enumerate(_ONES)} | _TENS
_TENS_RE = "|".join(_TENS)
_WORD_NUMBER = rf"(?:(?:{_TENS_RE})(?:[- ](?:one|two|three|four|five|six|seven|eight|nine)\b)?|{'|'.join(reversed(_ONES))})"
_NUMBER = rf"(?P<n>\d{{1,4}}|{_WORD_NUMBER})"
# "30 days", "30-day", "thirty days", "2 weeks", "6 months"; never "12 days ago".
_CALENDAR = rf"\b{_NUMBER}(?:\s+|-)(?:calendar(?:\s+|-))?(?P<unit>days?|weeks?|months?)\b(?!\s+ago)"
_BUSINESS = rf"\b{_NUMBER}(?:\s+|-)(?:business|working)(?:\s+|-)days?\b(?!\s+ago)"
_MONEY = r"(?:\$\s?(?P<usd>\d{1,6}(?:\.\d{1,2})?)|\b(?P<usd2>\d{1,6}(?:\.\d{1,2})?)\s?(?:dollars|usd)\b)"
_PERCENT = r"\b(?P<pct>\d{1,3}(?:\.\d{1,2})?)\s?(?:%|percent\b|per cent\b)"
_AMOUNT = rf"(?:{_MONEY}|{_PERCENT})"
_GAP = r".{0,60}?"  # within the clause, briefly: a term's words and its number stay close
_FEE_GAP = r"[^,]{0,40}?"  # a fee's name and its amount: no comma between them

_NEGATION = re.compile(r"\b(?:cannot|can't|can not|could not|couldn't|won't|will not|do not|don't|does not|doesn't|"
                       r"not|never|no longer|unable)\b")
# A clause ends at ; or a newline, or at . ! ? followed by a space (so "$7.50" stays whole).
_CLAUSE = re.compile(r"(?:[^;!?.\n]|[.!?](?!\s|$))+")

# (key, pattern), tried in this order; a span taken by one term is not read again by a later pattern.
_PATTERNS: list[tuple[str, str]] = [
    # refund_time: business days are how refunds are counted, never a return window
    ("refund_time", rf"{_BUSINESS}"),
    # the damage report window comes before the return window: "report damage within 7 days"
    ("damage_report_window", rf"\b(?:report|reported|reporting|notify|notified|tell us)\b{_GAP}\bwithin\s+{_CALENDAR}"),
    ("damage_report_window", rf"\b(?:damage|damaged|defect|defective)\b{_GAP}\bwithin\s+{_CALENDAR}"),
    ("damage_report_window", rf"{_CALENDAR}{_GAP}\bto\s+report\b"),
    ("return_window", rf"{_CALENDAR}(?:\s+|-)(?:return|returns)\s+(?:window|period|policy|guarantee)\b"),
    ("return_window", rf"\b(?:return|returns)\s+(?:window|period)\b{_GAP}\b{_CALENDAR}"),
    ("return_window", rf"\b(?:return|returns|returned|returning|send\b{_GAP}\bback|exchange)\b{_GAP}\b(?:within|for|up to|in)\s+{_CALENDAR}"),
    ("return_window", rf"{_CALENDAR}\s+(?:to|in which to)\s+(?:return|send)\b"),
    ("return_window", rf"\bwithin\s+{_CALENDAR}{_GAP}\b(?:return|returns|returned|send\b{_GAP}\bback)\b"),
    ("return_window", rf"{_CALENDAR}(?:\s+|-)(?:window|period)\b"),
    ("refund_time", rf"\b(?:refund|refunds|refunded|reimburse|reimbursed|credited)\b{_GAP}\bwithin\s+{_CALENDAR}"),
    # fees: the amount next to its name first, then a name and its amount in one comma-free stretch
    ("restocking_fee", rf"{_AMOUNT}(?:\s+|-)restocking\b"),
    ("return_shipping_fee", rf"{_MONEY}(?:\s+|-)(?:return\s+)?(?:shipping|postage|label)\b"),
    ("fee", rf"{_AMOUNT}(?:\s+|-)(?:fee|charge|deduction)\b"),
    ("restocking_fee", rf"\brestocking\s+(?:fee|charge)\b{_FEE_GAP}{_AMOUNT}"),
    ("return_shipping_fee", rf"\b(?:return\s+)?(?:shipping|postage|label)\b{_FEE_GAP}{_MONEY}"),
    ("fee", rf"\b(?:fee|charge)\s+of\s+{_AMOUNT}"),
    ("refund_method", r"\boriginal\s+(?:payment(?:\s+method)?|form\s+of\s+payment|method\s+of\s+payment|"
                      r"payment\s+card|card)\b"),
    ("refund_method", r"\bstore\s+credit\b"),
    ("refund_method", r"\b(?:to|onto)\s+(?:a|an|your|the)?\s*(?:different|new|another|other|second)\s+"
                      r"(?:credit\s+|debit\s+|bank\s+)?(?:card|account|payment\s+method)\b"),
]
_COMPILED = [(key, re.compile(pattern, re.IGNORECASE)) for key, pattern in _PATTERNS]


@dataclass(frozen=True)
class Term:
    key: str
    value: str
    phrase: str  # the words it was read from


def _number(text: str) -> int:
    text = text.lower().replace("-", " ")
    if text.isdigit():
        return int(text)
    return sum(_WORD_VALUES[w] for w in text.split())


def _duration(match: re.Match[str], business: bool) -> str:
    n = _number(match.group("n"))
    if business:
        return f"{n} business day{'s' if n != 1 else ''}"
    unit = match.group("unit").lower().rstrip("s")
    return f"{n} {unit}{'s' if n != 1 else ''}"


def _money(text: str) -> str:
    amount = float(text)
    return f"${int(amount)}" if amount == int(amount) else f"${amount:.2f}"


def _percent(text: str) -> str:
    amount = float(text)
    return f"{amount:g}%"


def _value(key: str, match: re.Match[str]) -> str:
    groups = match.groupdict()
    if key == "refund_method":
        phrase = match.group(0).lower()
        if "original" in phrase:
            return "original payment method"
        if "store credit" in phrase:
            return "store credit"
        return "different payment method"
    if groups.get("usd") or groups.get("usd2"):
        return _money(groups.get("usd") or groups["usd2"])
    if groups.get("pct"):
        return _percent(groups["pct"])
    return _duration(match, business="business" in match.group(0).lower() or "working" in match.group(0).lower())


def _negated(clause: str, start: int) -> bool:
    """A negation before the term in its clause: "we cannot refund to a different card"."""
    return bool(_NEGATION.search(clause[:start]))


def find_terms(text: str) -> list[Term]:
    """Every policy term stated in `text`, in order of appearance (a key may repeat)."""
    found: list[tuple[int, Term]] = []
    for clause_match in _CLAUSE.finditer(text or ""):
        clause = clause_match.group(0)
        taken: list[tuple[int, int]] = []
        for key, pattern in _COMPILED:
            for m in pattern.finditer(clause):
                # the number's span decides overlap: "a 30-day return window" is read once
                span = m.span("n") if "n" in m.groupdict() and m.group("n") else m.span()
                if m.groupdict().get("usd"):
                    span = m.span("usd")
                elif m.groupdict().get("usd2"):
                    span = m.span("usd2")
                elif m.groupdict().get("pct"):
                    span = m.span("pct")
                if any(a < span[1] and span[0] < b for a, b in taken):
                    continue
                taken.append(span)
                if key == "refund_method" and _negated(clause, m.start()):
                    continue
                found.append((clause_match.start() + span[0], Term(key, _value(key, m), " ".join(m.group(0).split()))))
    return [term for _, term in sorted(found, key=lambda item: item[0])]


def extract_terms(text: str) -> dict[str, str]:
    """Policy terms in `text` as key -> value; a key stated with two values gets both ("30 days; 90 days")."""
    out: dict[str, list[str]] = {}
    for term in find_terms(text):
        values = out.setdefault(term.key, [])
        if term.value not in values:
            values.append(term.value)
    return {key: "; ".join(values) for key, values in out.items()}


def canonical(value: str) -> str:
    """A stored term value in the extractor's canonical form: "45-day" -> "45 days", "15 %" -> "15%"."""
    text = " ".join(str(value).split())
    for key, pattern in (("d", re.compile(_BUSINESS, re.I)), ("d", re.compile(_CALENDAR, re.I)),
                         ("m", re.compile(_MONEY, re.I)), ("p", re.compile(_PERCENT, re.I))):
        m = pattern.search(text)
        if m is not None and len(m.group(0)) >= len(text.strip(" .")) - 1:
            if key == "d":
                return _duration(m, business=pattern.pattern == _BUSINESS)
            if key == "m":
                return _money(m.group("usd") or m.group("usd2"))
            return _percent(m.group("pct"))
    found = find_terms(text)
    if len(found) == 1 and found[0].key == "refund_method":
        return found[0].value
    return text.lower()
