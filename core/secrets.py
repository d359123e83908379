"""Secrets: what counts as one, and the redaction applied where text enters loopterm.

A secret is

- the value of an environment variable whose name says it holds a credential: a name part ``KEY``,
  ``APIKEY``, ``TOKEN``, ``SECRET``, ``PASSWORD``, ``PASSWD`` or ``PASSPHRASE`` (``OPENAI_API_KEY``,
  ``ANTHROPIC_API_KEY``, ``GITHUB_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``DB_PASSWORD``), at least
  ``MIN_SECRET_LENGTH`` characters long (a shorter value would erase ordinary text). Values present at
  start are known from the first use; a variable set later is picked up, and a value stays a secret
  after its variable is unset;
- the value of an ``Authorization`` / ``Proxy-Authorization`` header after its scheme (``Bearer``,
  ``Basic``, ``token``), a bare ``Bearer`` token with a digit in it; after a name ending in ``key``,
  ``token``, ``auth``, ``secret`` or ``password`` (``x-api-key: ...``, ``api_key=...``, ``"token": "..."``),
  a token of 16+ characters that looks generated (letters and digits alternate 4+ times: hex, base64);
  a quoted value after ``password``/``secret`` (``password="..."``); any value ending the line or word
  after an upper-case ``NAME=`` (an environment file, ``export API_TOKEN=...``). A bare ``key`` counts
  only with ``=``, so a JSON field named "key" holding a digest is left alone. These values are often in
  code a model writes, so they favour precision: an identifier, an attribute, a call, a ``$VARIABLE``,
  an f-string or a path after the name is never redacted (it would corrupt the code);
- a key-shaped string: ``sk-...`` (OpenAI, ``sk-ant-`` Anthropic), ``sk_live_``/``rk_live_``, ``AKIA``/
  ``ASIA`` (AWS), ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``/``github_pat_`` (GitHub), ``xox[abpors]-``
  (Slack), ``AIza`` (Google), ``hf_`` (Hugging Face), JWTs, PEM private key blocks.

``redact(text)`` replaces each with a marker: ``[redacted:OPENAI_API_KEY]`` for an environment value
(the variable's name), ``[redacted:key]`` for anything else. ``redact_tree(obj)`` does it to every
string in a JSON-like value (dict keys included) and returns the very same object when nothing changed.

It is applied once, where data enters: model replies and prompts, tool results, gate output, the
events and messages the engine writes, the export, logging, and the screen renderers.

Fast on clean text: the patterns are compiled once and anchored on literal triggers found with
``str.find``, each looked for only when a character it needs is in the text; recent texts (a prompt's
system message, a decision's field names) are answered from a small cache. About 17 us per iteration of
bench/engine_overhead.py's loop.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from typing import Any, Callable

MIN_SECRET_LENGTH = 8
KEY_MARKER = "[redacted:key]"

# Name parts (split on anything not a letter or digit) that make an environment variable a secret.
_NAME_PARTS = frozenset({"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE"})
_NAME_SPLIT = re.compile(r"[^A-Za-z0-9]+")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a credential (its value is never shown or passed on)."""
    return any(part in _NAME_PARTS for part in _NAME_SPLIT.split(name.upper()))


def without_secrets(env: dict[str, str]) -> dict[str, str]:
    """A copy of an environment without the variables that hold credentials."""
    return {k: v for k, v in env.items() if not is_secret_name(k)}


def marker(name: str) -> str:
    return f"[redacted:{name}]"


# ----------------------------------------------------------------------------- environment values

_lock = threading.Lock()
_env_seen: Any = None  # the environment (its raw mapping, copied) the values below were read from
_env_values: dict[str, str] = {}  # secret value -> variable name; grows, never shrinks
_env_ordered: tuple[tuple[str, str], ...] = ()  # (value, marker), longest value first


def _environ_data() -> Any:
    """The environment's raw mapping (bytes on POSIX): comparing it with a copy costs about a microsecond."""
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) else dict(os.environ)


def _env_secrets() -> tuple[tuple[str, str], ...]:
    global _env_seen, _env_ordered
    data = _environ_data()
    if data == _env_seen:
        return _env_ordered
    with _lock:
        found = False
        for name, value in os.environ.items():
            if len(value) >= MIN_SECRET_LENGTH and is_secret_name(name) and not value.isspace():
                value = value.strip()
                if len(value) >= MIN_SECRET_LENGTH and value not in _env_values:
                    _env_values[value] = name
                    found = True
        if found:
            _env_ordered = tuple(
                (value, marker(name)) for value, name in sorted(_env_values.items(), key=lambda kv: -len(kv[0]))
            )
            _cache.clear()
            _long_cache.clear()
            _sections.clear()
            _section_chars[0] = 0
        _env_seen = dict(data)
    return _env_ordered


def secrets_known() -> object:
    """A token for the environment's secrets as redaction knows them now: the very same object until a new one
    is found. A value redacted while it was current needs no second pass while it still is."""
    return _env_secrets()


def secret_values() -> dict[str, str]:
    """The environment's secret values known so far, by value (for tests and diagnostics: handle with care)."""
    _env_secrets()
    return dict(_env_values)


# ----------------------------------------------------------------------------- patterns

# These values are often what a model writes into a tool's arguments (code, a shell script, a config
# file), so the patterns after a name favour precision: a false positive would corrupt the code.
#
# A header's value after its scheme: stops at whitespace, quotes and separators; never a marker, a
# variable (`$TOKEN`, `%TOKEN%`), a placeholder or an f-string (`{token}`, `<token>`).
_VALUE = r"(?![\[$%{<])[^\s\"'`,;<>(){}\[\]\\]+"
# A token after a name (key=, "token":, auth=): 16+ characters of a key's alphabet that look random
# (see _random: an identifier or an attribute like `_KEEP.__contains__` is never one).
_TOKEN = r"(?![\[$%{<])[A-Za-z0-9+/_\-]{16,}={0,2}"
# A password in quotes after its name ("password": "...", secret='...'): 6+ characters, not a lowercase
# word, not a path.
_QUOTED = r"(?-i:(?![a-z]+[\"']|/))[^\s\"'`,;<>(){}\[\]\\]{6,}(?=\\?[\"'])"
_SEP = r"\\?[\"']?[ \t]*[:=][ \t]*\\?[\"']?"
_SEP_QUOTE = r"\\?[\"']?[ \t]*[:=][ \t]*\\?[\"']"


def _random(value: str) -> bool:
    """Whether a token looks generated rather than written: it switches between letters and digits at
    least four times (hex, base64 and most API keys do; identifiers such as sha256_digest do not)."""
    switches, last = 0, None
    for c in value:
        kind = "d" if c.isdigit() else "a" if c.isalpha() else None
        if kind is not None:
            if last is not None and kind != last:
                switches += 1
            last = kind
    return switches >= 4


# Case-sensitive key shapes, in groups: a group is looked at only when its character is in the text
# (one memchr). Each entry: a literal found with str.find, how far the shape starts before it, and the
# shape (matched where it starts, which must not follow a letter or digit: "task-..." is not "sk-...").
_SHAPES: tuple[tuple[str, tuple[tuple[str, int, re.Pattern[str]], ...]], ...] = (
    ("-", (
        ("sk-", 0, re.compile(r"sk-[A-Za-z0-9_\-]{8,}")),  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), Langfuse
        ("xox", 0, re.compile(r"xox[abposr]-[A-Za-z0-9\-]{10,}")),  # Slack
        ("-----BEGIN", 0, re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)",
                                     re.DOTALL)),
    )),
    ("_", (
        ("k_", 1, re.compile(r"[sr]k_(?:live|test)_[A-Za-z0-9]{10,}")),  # Stripe
        ("gh", 0, re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}")),  # GitHub
        ("github_pat_", 0, re.compile(r"github_pat_[A-Za-z0-9_]{20,}")),
        ("hf_", 0, re.compile(r"hf_[A-Za-z0-9]{30,}")),  # Hugging Face
    )),
    ("A", (
        ("AKIA", 0, re.compile(r"AKIA[0-9A-Z]{16}")),  # AWS access key ids
        ("ASIA", 0, re.compile(r"ASIA[0-9A-Z]{16}")),
        ("AIza", 0, re.compile(r"AIza[0-9A-Za-z_\-]{30,}")),  # Google
    )),
    ("J", (
        ("eyJ", 0, re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")),  # JWT
    )),
)

# Case-insensitive, found in the ASCII-lowercased text: (trigger, (pattern, check) tried in order at it;
# the group "secret" is what is replaced, when the check, if any, passes). All but bearer need ":" or "="
# in the text.
_Check = Callable[[str], bool] | None
_WORDS: tuple[tuple[str, tuple[tuple[re.Pattern[str], _Check], ...]], ...] = tuple(
    (trigger, tuple((re.compile(p, re.IGNORECASE), check) for p, check in patterns))
    for trigger, patterns in (
        # With a scheme (Bearer, Basic, token) the header's whole value is the credential; without one,
        # a value that looks generated.
        ("auth", ((rf"authorization{_SEP}(?:bearer|basic|token|digest|bot)[ \t]++(?P<secret>{_VALUE})", None),
                  (rf"authorization{_SEP}(?P<secret>{_VALUE})", _random),
                  (rf"auth{_SEP}(?P<secret>{_TOKEN})", _random))),
        ("key", ((rf"key{_SEP}(?P<secret>{_TOKEN})", _random),)),
        ("token", ((rf"token{_SEP}(?P<secret>{_TOKEN})", _random),)),
        ("secret", ((rf"secret{_SEP_QUOTE}(?P<secret>{_QUOTED})", None), (rf"secret{_SEP}(?P<secret>{_TOKEN})", _random))),
        ("pass", ((rf"pass(?:word|wd|phrase){_SEP_QUOTE}(?P<secret>{_QUOTED})", None),
                  (rf"pass(?:word|wd|phrase){_SEP}(?P<secret>{_TOKEN})", _random))),
    )
)
# An environment file's or shell's assignment to an upper-case name (DB_PASSWORD=..., export API_TOKEN=...):
# any value of 8+ characters ending the line or the word (a keyword argument, a call or a variable is code).
_ENV_STYLE = re.compile(r"(?:key|token|secret|password|passwd|passphrase|auth)=(?P<secret>(?![\[$%{<])"
                        r"[^\s\"'`,;<>(){}\[\]\\&]{8,}+)(?=[\s&;\"']|$)", re.IGNORECASE)


def _upper_name(text: str, at: int, end: int) -> bool:
    """Whether the name ending at `end` (through the trigger at `at`) is all upper case: DB_PASSWORD, not password."""
    start = at
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    name = text[start:end]
    return name.isupper()


_BEARER = re.compile(r"bearer[ \t]+(?P<secret>(?![\[$%{<])(?=[A-Za-z0-9._~+/=\-]*[0-9])[A-Za-z0-9._~+/=\-]{8,})",
                     re.IGNORECASE)


def _spans(text: str) -> list[tuple[int, int]]:
    """Where the key-shaped strings and credential values are in `text` (possibly overlapping)."""
    spans: list[tuple[int, int]] = []
    for char, shapes in _SHAPES:
        if char not in text:
            continue
        for literal, back, pattern in shapes:
            at = text.find(literal)
            while at != -1:
                start = at - back
                if start >= 0 and (start == 0 or not text[start - 1].isalnum()):
                    m = pattern.match(text, start)
                    if m is not None:
                        spans.append(m.span())
                at = text.find(literal, at + 1)
    assigned = ":" in text or "=" in text
    bearer = "earer" in text or "EARER" in text
    if not (assigned or bearer):
        return spans
    # ASCII-lowercased with one character per character, so positions agree with `text`.
    low = text.encode("ascii", "replace").lower().decode("ascii")
    if assigned:
        for trigger, patterns in _WORDS:
            at = low.find(trigger)
            while at != -1:
                # A bare "key" (not the end of a longer name such as api_key or x-api-key) counts only
                # with "=": `"key": "<digest>"` is how loopterm's own records name a call's idempotency key.
                if trigger == "key" and (at == 0 or not (low[at - 1].isalnum() or low[at - 1] in "_-")):
                    if not low[at + 3:at + 11].lstrip("\\\"' \t").startswith("="):
                        at = low.find(trigger, at + 1)
                        continue
                for pattern, check in patterns:
                    m = pattern.match(text, at)
                    if m is not None and (check is None or check(m.group("secret"))):
                        spans.append(m.span("secret"))
                        break
                else:
                    m = _ENV_STYLE.match(text, at)
                    if m is not None and _upper_name(text, at, m.start("secret") - 1):
                        spans.append(m.span("secret"))
                at = low.find(trigger, at + 1)
    if bearer:
        at = low.find("bearer")
        while at != -1:
            m = _BEARER.match(text, at)
            if m is not None:
                spans.append(m.span("secret"))
            at = low.find("bearer", at + 1)
    return spans


# Redacted results of recent texts: a prompt's system message, a decision's field names and its usual
# values are the same every iteration. None marks a text that holds no secret. Bounded: cleared when full.
_cache: dict[str, str | None] = {}
_long_cache: dict[str, str | None] = {}
_SHORT, _CACHE_ITEMS, _LONG_CACHE_ITEMS, _LONGEST_CACHED = 256, 4_096, 64, 65_536
_MISS = object()

# A long text made of blank-line separated sections (a prompt: system message, tool docs, task, then the
# state and the facts that change) is redacted section by section, each section answered from this cache
# when it was seen before: only what is new is scanned. No secret shape spans a blank line (the name=value
# and header patterns stop at whitespace, key shapes hold no whitespace), except a PEM block and an
# environment value that holds one: a text with "-----BEGIN" in it, or with such a value known, is
# redacted whole. Measured on prose with names and values (bench: 1-64 KB, one new section of 300
# characters): 2-13x faster than a whole scan from 1 KB up. Bounded by characters held; cleared with the other caches when the secrets change.
_SECTION = "\n\n"
_sections: dict[str, str | None] = {}
_section_chars = [0]
_SECTION_CHARS = 4_000_000
_SECTIONED = 1_024  # shorter texts are scanned whole: splitting and looking up costs more than it saves


def redact(text: str) -> str:
    """`text` with every secret replaced by a marker (see the module's docstring)."""
    if not isinstance(text, str) or len(text) < MIN_SECRET_LENGTH:
        return text
    return _redact(text, _env_secrets())


def _redact(text: str, env: tuple[tuple[str, str], ...]) -> str:
    """redact() with the environment's secrets already read (a tree reads them once, not per string:
    comparing the environment costs about a microsecond, more than a cached string)."""
    if len(text) < MIN_SECRET_LENGTH:
        return text
    cache = _cache if len(text) < _SHORT else _long_cache if len(text) <= _LONGEST_CACHED else None
    if cache is not None:
        hit = cache.get(text, _MISS)
        if hit is not _MISS:
            return text if hit is None else hit  # type: ignore[return-value]
    if len(text) >= _SECTIONED and _SECTION in text and "-----BEGIN" not in text and not _env_splits(env):
        clean = _redact_sections(text, env)
    else:
        clean = _redact_whole(text, env)
    if cache is not None:
        if len(cache) >= (_CACHE_ITEMS if cache is _cache else _LONG_CACHE_ITEMS):
            cache.clear()
        cache[text] = None if clean is text else clean
    return clean


def _env_splits(env: tuple[tuple[str, str], ...]) -> bool:
    """Whether an environment secret holds a blank line (an occurrence could span two sections)."""
    return env is not _env_checked[0] and _check_env(env)


_env_checked: list[Any] = [None]


def _check_env(env: tuple[tuple[str, str], ...]) -> bool:
    if any(_SECTION in value for value, _ in env):
        return True
    _env_checked[0] = env
    return False


def _redact_sections(text: str, env: tuple[tuple[str, str], ...]) -> str:
    """`text` redacted one blank-line separated section at a time, sections seen before from the cache:
    the same result as redacting it whole (see _sections), the very same object if nothing changed."""
    parts = text.split(_SECTION)
    changed = False
    for i, part in enumerate(parts):
        if len(part) < MIN_SECRET_LENGTH:
            continue
        hit = _sections.get(part, _MISS)
        if hit is _MISS:
            clean = _redact_whole(part, env)
            if _section_chars[0] + len(part) > _SECTION_CHARS:
                _sections.clear()
                _section_chars[0] = 0
            _sections[part] = None if clean is part else clean
            _section_chars[0] += len(part) + (0 if clean is part else len(clean))
        else:
            clean = part if hit is None else hit  # type: ignore[assignment]
        if clean is not part:
            parts[i] = clean
            changed = True
    return _SECTION.join(parts) if changed else text


def _redact_whole(text: str, env: tuple[tuple[str, str], ...]) -> str:
    """`text` redacted in one scan; the very same object if it holds no secret."""
    for value, mark in env:
        if value in text:
            text = text.replace(value, mark)
    spans = _spans(text)
    if spans:
        spans.sort()
        parts: list[str] = []
        last = 0
        start, end = spans[0]
        for s, e in spans[1:]:
            if s <= end:
                end = max(end, e)
                continue
            parts += (text[last:start], KEY_MARKER)
            last, (start, end) = end, (s, e)
        parts += (text[last:start], KEY_MARKER, text[end:])
        text = "".join(parts)
    return text


def redact_tree(obj: Any) -> Any:
    """Every string in a JSON-like value (dicts, lists, tuples; dict keys too) redacted.

    Returns `obj` itself when nothing in it changed, so redacting clean data copies nothing.
    """
    return _tree(obj, _env_secrets())


def _tree(obj: Any, env: tuple[tuple[str, str], ...]) -> Any:
    if isinstance(obj, str):
        return _redact(obj, env)
    if isinstance(obj, dict):
        changed = False
        items = []
        for k, v in obj.items():
            k2 = _redact(k, env) if isinstance(k, str) else k
            v2 = _tree(v, env)
            changed = changed or k2 is not k or v2 is not v
            items.append((k2, v2))
        return dict(items) if changed else obj
    if isinstance(obj, (list, tuple)):
        redacted = [_tree(v, env) for v in obj]
        if all(a is b for a, b in zip(redacted, obj)):
            return obj
        return type(obj)(redacted) if type(obj) in (list, tuple) else redacted
    return obj


def redact_capped(text: str, limit: int, more: int = 0) -> str:
    """Redact, then cap at `limit` characters (as tools.cap_text does), scanning no more than the cap keeps.

    Redaction comes first, so a cap never cuts a key in two and keeps its first half; only the first
    `limit` characters and a margin longer than any key are scanned, however long the text. `more`:
    characters the caller already dropped from the end (counted in the cut's note).
    """
    margin = 4_096
    if len(text) > limit + margin:
        more += len(text) - (limit + margin)
        text = text[: limit + margin]
    text = redact(text)
    if len(text) <= limit and not more:
        return text
    return text[:limit] + f"\n[... {len(text) - limit + more} more characters cut]"


# ----------------------------------------------------------------------------- logging and warnings


def _redacting_factory(previous: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it as usual later
            return record
        clean = redact(message)
        if clean is not message and clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    factory._loopterm_redacting = True  # type: ignore[attr-defined]
    return factory


def install_log_redaction() -> None:
    """Every log record created from now on (any logger, any handler) carries its message redacted;
    so do warnings shown by the warnings module. Idempotent."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "_loopterm_redacting", False):
        logging.setLogRecordFactory(_redacting_factory(current))
    if not getattr(warnings.formatwarning, "_loopterm_redacting", False):
        original = warnings.formatwarning

        def formatwarning(message: Any, *args: Any, **kwargs: Any) -> str:
            return redact(original(message, *args, **kwargs))

        formatwarning._loopterm_redacting = True  # type: ignore[attr-defined]
        warnings.formatwarning = formatwarning  # type: ignore[assignment]


install_log_redaction()
