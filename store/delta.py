"""State deltas and keyframes: pure functions on JSON trees (dicts with str keys, lists, scalars).

A delta is a list of ops that turns the state at n-1 into the state at n:

    ["s", path, value]   set the dict key or list index at `path` (path [] replaces the root)
    ["d", path]          delete the dict key at `path`
    ["a", path, items]   extend the list at `path` with `items`
    ["t", path, length]  truncate the list at `path` to `length`
    ["h", path, count]   drop the first `count` items of the list at `path`

A path is a list of dict keys (str) and list indexes (int). `diff` finds an
append when the old list is a prefix of the new one, so a log that grows by one
item costs one item, whatever its length; and a sliding window (items dropped
at the front, others appended) costs the new items, not the whole window.

A keyframe is the whole state with every list longer than CHUNK_ITEMS replaced
by the hashes of its fixed-boundary chunks ([0:64], [64:128], ...). Chunks are
stored content-addressed, so the full chunks of a growing list are written once
and shared by every later keyframe (and every branch).
"""

from __future__ import annotations

import hashlib
import json

import math
import zlib

import orjson
from collections.abc import Callable, Iterable
from typing import Any

from loopterm.core.persistence import GrownList

SET, DELETE, APPEND, TRUNCATE, DROP_FRONT = "s", "d", "a", "t", "h"
CHUNK_ITEMS = 64  # a list longer than this is chunked in keyframes, this many items a chunk
SMALL_LIST = 32  # lists up to this length are compared element by element, type-strictly
MIN_ELEMENT_EDITS = 8  # a list with more edited elements than max(this, len/4) is set whole
MAX_SHIFT = 64  # a window that slid by up to this many items is found (a transcript pruned now and then)

Path = list[str | int]



PACK_ABOVE = 200  # bytes: a stored state body longer than this is kept zlib-compressed when that is smaller
PACK_LEVEL = 6


def pack(text: str) -> str | bytes:
    """A state body as stored: the JSON text, or its zlib compression (a BLOB) when that is smaller.
    `loads` reads both: JSON never starts with "x", which every zlib stream does (0x78)."""
    raw = text.encode()
    if len(raw) <= PACK_ABOVE:
        return text
    packed = zlib.compress(raw, PACK_LEVEL)
    return packed if len(packed) < len(raw) else text


def unpack(text: str | bytes) -> bytes:
    """The JSON text of a stored body (see `pack`), as UTF-8."""
    if isinstance(text, str):
        return text.encode()
    return zlib.decompress(text) if text[:1] == b"x" else text


def loads(text: str | bytes) -> Any:
    """JSON text (or a `pack`ed body) to Python: orjson for speed (decoding dominates reading a state
    back), the standard library for what orjson refuses (NaN) or would read wrong (integers beyond 64 bits).

    orjson reads an integer beyond 64 bits as a float, so a list of strings, integers, booleans and nulls
    (a list chunk, most often) is right as read; any other text goes to the standard library when it holds
    a run of 19 digits (found at C speed: digits mapped to "0", the rest to ".") where a number may start
    (after `[`, `,` or `:`): a long run of digits inside a string (a hex digest, a nanosecond timestamp
    written as text) is read by orjson, at a quarter of the standard library's time. Searching a chunk of
    64 strings cost twice orjson's parse of it (list load at 5,000: -2.4 ms)."""
    raw = zlib.decompress(text) if isinstance(text, bytes) and text[:1] == b"x" else text
    value = _UNREAD
    if raw[:1] in ("[", b"["):  # orjson reads a str's UTF-8 as it is: no copy of a chunk's text
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.loads(raw)
        if set(map(type, value)) <= _NO_FLOAT:
            return value
    data = raw.encode() if isinstance(raw, str) else raw
    if _long_integer(data):
        return json.loads(data)
    if value is not _UNREAD:
        return value
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


_UNREAD = object()
_NO_FLOAT = frozenset({str, int, bool, type(None)})
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x2E for c in range(256))
_LONG_NUMBER = b"0" * 19
_NUMBER_BEFORE = frozenset(b"[,:")  # what a JSON number follows (or the text's start), white space aside


def _long_integer(data: bytes) -> bool:
    """Whether the JSON text may hold a number of 19 digits or more: a run of them where a number may
    start. A run inside a string may pass too (then only a slower read, never a wrong one)."""
    digits = data.translate(_DIGITS)
    at = digits.find(_LONG_NUMBER)
    while at >= 0:  # the leftmost match: a run's first digit
        j = at - 1
        if j >= 0 and data[j] == 0x2D:  # "-"
            j -= 1
        while j >= 0 and data[j] in b" \t\r\n":
            j -= 1
        if j < 0 or data[j] in _NUMBER_BEFORE:
            return True
        end = digits.find(b".", at)  # past this run
        at = digits.find(_LONG_NUMBER, end) if end >= 0 else -1
    return False


def dumps(value: Any) -> str:
    """Compact JSON, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def content_hash(text: str) -> str:
    """The address of a blob: 128-bit BLAKE2b of its UTF-8 text, hex."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


IMMUTABLE = frozenset({str, int, float, bool, type(None)})  # leaves a copy may share


def copy_tree(value: Any) -> Any:
    """A copy of the containers of a JSON tree (tuples become lists); scalars are shared, being immutable.

    Sharing the leaves is what keeps `diff` fast next time: an unchanged string
    in a long list is then the same object on both sides, compared by identity.
    A container of leaves only is copied at C speed (a state of 5,000 strings: 0.67 -> 0.11 ms).
    """
    if isinstance(value, dict):
        if set(map(type, value.values())) <= IMMUTABLE:
            return dict(value)
        return {key: copy_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if set(map(type, value)) <= IMMUTABLE:
            return list(value)
        return [copy_tree(item) for item in value]
    return value


# -- diff ------------------------------------------------------------------------


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[list[Any]]:
    """The ops that turn `old` into `new` (values in the ops are `new`'s objects, not copies)."""
    ops: list[list[Any]] = []
    _diff(old, new, [], ops)
    return ops


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type, so 1, 1.0 and True stay apart (and 0.0 and -0.0)."""
    if a is b:
        return True
    if type(a) is not type(b) or a != b:
        return False
    return type(a) is not float or a != 0 or math.copysign(1.0, a) == math.copysign(1.0, b)


def _json_same(a: Any, b: Any) -> bool:
    """For two containers already equal by `==`: whether they are also equal type-strictly.

    orjson writes 1, 1.0 and true (and 0.0 and -0.0) differently, so equal bytes mean equal
    types too; this runs at C speed, where walking both trees in Python cost most of a diff.
    What orjson cannot write (integers beyond 64 bits, non-str keys) answers False: the
    caller then compares element by element, as before.
    """
    try:
        return orjson.dumps(a) == orjson.dumps(b)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return False


_PLAIN = (str, int, bool, type(None))
_ABSENT = object()  # scalars whose == is type-strict once their types match


def _unchanged(before: Any, value: Any) -> bool:
    """A cheap test that `value` equals `before` type-strictly; False means "not known", not "different"."""
    kind = type(before)
    if kind is not type(value):
        return False
    if kind in _PLAIN:
        return bool(before == value)
    return (kind is dict or kind is list) and before == value and _json_same(before, value)


def _diff_dict(old: dict[str, Any], new: dict[str, Any], path: Path, ops: list[list[Any]]) -> None:
    """A dict of many entries with a few changed is the common case: the entries are compared with `==`
    in comprehensions (C speed, no Python per entry but the loop's), then those `==` calls equal are
    checked type-strictly all at once through orjson (1, 1.0, True and 0.0, -0.0 stay apart)."""
    get = old.get
    if len(old) > len(new) or old.keys() - new.keys():
        for key in old:
            if key not in new:
                ops.append([DELETE, path + [key]])
    # The same object (a dump reusing the previous one's entries) needs no `==`: a dict's `!=` walks its
    # entries even against itself (200 records: 30 -> 12 us).
    moved = [key for key, value in new.items() if get(key, _ABSENT) is not value]
    differ = [key for key in moved if get(key, _ABSENT) != new[key]]
    for key in differ:
        before = get(key, _ABSENT)
        if before is _ABSENT:
            ops.append([SET, path + [key], new[key]])
        else:
            _diff(before, new[key], path + [key], ops)
    if len(differ) == len(moved):
        return
    skip = set(differ)
    alike = [key for key in moved if key not in skip]
    if alike and not _json_same([old[key] for key in alike], [new[key] for key in alike]):
        for key in alike:  # rare: 1 against 1.0 or True somewhere (or what orjson cannot write)
            if not _json_same(old[key], new[key]):
                _diff(old[key], new[key], path + [key], ops)


def _diff(old: Any, new: Any, path: Path, ops: list[list[Any]]) -> None:
    if isinstance(new, tuple):
        new = list(new)
    if type(old) is dict and isinstance(new, dict):
        _diff_dict(old, new, path, ops)
    elif isinstance(old, list) and isinstance(new, list):
        _diff_list(old, new, path, ops)
    elif not _same(old, new):
        ops.append([SET, path, new])


def _equal(a: Any, b: Any) -> bool:
    """Deep equality that tells 1, 1.0, True (and 0.0, -0.0) apart: for short lists."""
    if a is b:
        return True
    kind = type(a)
    if kind is dict:
        return type(b) is dict and a.keys() == b.keys() and all(_equal(value, b[key]) for key, value in a.items())
    if kind is list:
        return type(b) is list and len(a) == len(b) and all(map(_equal, a, b))
    return _same(a, b)


def _lists_equal(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(_equal, a, b))


_STRICT_ITEMS = {str, type(None)}  # == between these is already type-strict


def _long_lists_equal(a: list[Any], b: list[Any]) -> bool:
    """Type-strict equality of two long lists at C speed: `==` first (it lets 1 == 1.0 == True and
    0.0 == -0.0 through), then, unless every item is a string or null, the same check through orjson's
    bytes (the Python walk only where orjson cannot write the items)."""
    if a != b:
        return False
    if set(map(type, a)) <= _STRICT_ITEMS:
        return True
    return _json_same(a, b) or _lists_equal(a, b)


def _diff_list(old: list[Any], new: list[Any], path: Path, ops: list[list[Any]]) -> None:
    lo, ln = len(old), len(new)
    if type(new) is GrownList and new.base is old:  # its builder vouches for the prefix: see GrownList
        if ln > lo:
            ops.append([APPEND, path, new[lo:]])
        return
    # Long lists are compared at C speed, short ones item by item; both type-strictly.
    same = _lists_equal if lo <= SMALL_LIST else _long_lists_equal
    if ln >= lo and same(new[:lo], old):
        if ln > lo:
            ops.append([APPEND, path, new[lo:]])
        return
    if ln < lo and same(new, old[:ln]):
        ops.append([TRUNCATE, path, ln])
        return
    for k in range(1, min(lo - 1, MAX_SHIFT) + 1):
        kept = lo - k
        if kept <= ln and _same_first(new, old, k) and same(new[:kept], old[k:]):
            ops.append([DROP_FRONT, path, k])
            if ln > kept:
                ops.append([APPEND, path, new[kept:]])
            return
    common = min(lo, ln)
    limit = max(MIN_ELEMENT_EDITS, common // 4)
    edits: list[list[Any]] = []
    for i in range(common):
        a, b = old[i], new[i]
        if a is b or _unchanged(a, b):
            continue
        if type(a) in (dict, list) and isinstance(b, (dict, list, tuple)):
            before = len(edits)
            _diff(a, b, path + [i], edits)
            if len(edits) == before:
                continue
        elif _same(a, b):
            continue
        else:
            edits.append([SET, path + [i], b])
        if len(edits) > limit:
            ops.append([SET, path, new])
            return
    ops.extend(edits)
    if ln > lo:
        ops.append([APPEND, path, new[lo:]])
    elif ln < lo:
        ops.append([TRUNCATE, path, ln])


def _same_first(new: list[Any], old: list[Any], k: int) -> bool:
    """A cheap filter before comparing a whole shifted list."""
    return bool(new) and (new[0] is old[k] or new[0] == old[k])


# -- the stored form of a delta ---------------------------------------------------
#
# Stored since issue 15 as a tree of the ops' paths, each key written once (a JSON object, where the
# first form was the flat list of ops above, one full path each, which is still read):
#
#     node   {key: entry, ...}      keys of a dict, or (under "i") indexes of a list, as strings
#     entry  [code, arg]            an op at this key: ["s", value], ["d"], ["a", items], ["t", length],
#                                   ["h", count]
#            {key: entry, ...}      a step down into the dict at this key (a node)
#            ["i", node]            a step down into the list at this key (its items by index)
#            ["m", entry, ...]      several, in order (a window that slid: ["h", 1] then ["a", items])

NODE, ITEMS, MANY = "n", "i", "m"


def encode_delta(ops: list[list[Any]]) -> str:
    """The stored text of a delta: its ops as one tree of their paths (see above)."""
    if any(not op[1] for op in ops):  # the root replaced: only the flat form says that
        return dumps(ops)
    root: dict[str, list[Any]] = {}
    for op in ops:
        path = op[1]
        node = root
        for i, step in enumerate(path[:-1]):
            code = ITEMS if type(path[i + 1]) is int else NODE
            items = node.setdefault(str(step), [])
            if not items or items[-1][0] != code:  # merge only with the last entry: order within a key holds
                items.append([code, {}])
            node = items[-1][1]
        node.setdefault(str(path[-1]), []).append([op[0], *op[2:]])
    return dumps_fast(_entries(root))


def _entries(node: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, items in node.items():
        for i, item in enumerate(items):
            if item[0] == NODE:
                items[i] = _entries(item[1])
            elif item[0] == ITEMS:
                item[1] = _entries(item[1])
        out[key] = items[0] if len(items) == 1 else [MANY, *items]
    return out


# What the standard library would not write as orjson does (datetimes, dataclasses, subclasses of str, int,
# list, dict) is refused, so it goes the standard library's way.
_AS_JSON_DOES = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps_fast(value: Any, slow: Callable[[Any], str] = dumps) -> str:
    """JSON text at C speed (orjson, compact, non-ASCII kept); `slow` for what orjson cannot write
    faithfully: integers beyond 64 bits, keys that are not strings (refused), and NaN and the
    infinities (written as null: found by reading the text back, only when it holds a null)."""
    try:
        raw = orjson.dumps(value, option=_AS_JSON_DOES)
    except TypeError:
        return slow(value)
    if b"null" in raw and orjson.loads(raw) != value:
        return slow(value)
    return raw.decode()


def decode_delta(text: str | bytes) -> list[list[Any]]:
    """A stored delta's ops, in either stored form (fresh objects)."""
    body = loads(text)
    if isinstance(body, list):  # the first form: the ops themselves
        return body
    ops: list[list[Any]] = []
    _flatten(body, [], False, ops)
    return ops


def _flatten(node: dict[str, Any], path: Path, indexes: bool, ops: list[list[Any]]) -> None:
    for key, entry in node.items():
        at = [*path, int(key) if indexes else key]
        for item in entry[1:] if type(entry) is list and entry[0] == MANY else (entry,):
            if type(item) is dict:
                _flatten(item, at, False, ops)
            elif item[0] == ITEMS:
                _flatten(item[1], at, True, ops)
            else:
                ops.append([item[0], at, *item[1:]])


def apply_delta(state: dict[str, Any], text: str | bytes) -> dict[str, Any]:
    """Apply a stored delta (either form) in place; returns `state`. The compact form is applied as the
    tree it is, each container reached once, which is what makes a long chain quick to read."""
    body = loads(text)
    if isinstance(body, list):
        return apply(state, body)
    _apply_node(state, body, False)
    return state


def _apply_node(node: Any, entries: dict[str, Any], indexes: bool) -> None:
    for name, entry in entries.items():
        key: str | int = int(name) if indexes else name
        for item in entry[1:] if type(entry) is list and entry[0] == MANY else (entry,):
            if type(item) is dict:
                _apply_node(node[key], item, False)
                continue
            code = item[0]
            if code == SET:
                node[key] = item[1]
            elif code == ITEMS:
                _apply_node(node[key], item[1], True)
            elif code == APPEND:
                node[key].extend(item[1])
            elif code == DROP_FRONT:
                del node[key][: item[1]]
            elif code == TRUNCATE:
                del node[key][item[1]:]
            elif code == DELETE:
                del node[key]
            else:
                raise ValueError(f"unknown delta op {code!r}")


# -- apply -----------------------------------------------------------------------


def _walk(node: Any, path: Iterable[str | int]) -> Any:
    for key in path:
        node = node[key]
    return node


def apply(state: dict[str, Any], ops: list[list[Any]]) -> dict[str, Any]:
    """Apply ops in place (the ops' values become part of `state`); returns `state`."""
    for op in ops:
        code, path = op[0], op[1]
        if code == SET:
            if not path:
                state.clear()
                state.update(op[2])
            else:
                _walk(state, path[:-1])[path[-1]] = op[2]
        elif code == DELETE:
            del _walk(state, path[:-1])[path[-1]]
        elif code == APPEND:
            _walk(state, path).extend(op[2])
        elif code == TRUNCATE:
            del _walk(state, path)[op[2]:]
        elif code == DROP_FRONT:
            del _walk(state, path)[: op[2]]
        else:
            raise ValueError(f"unknown delta op {code!r}")
    return state


def apply_copy(state: dict[str, Any], ops: list[list[Any]]) -> dict[str, Any]:
    """Apply ops to a copy: only the containers on the ops' paths are copied, the rest is shared."""
    root = dict(state)
    owned: dict[int, Any] = {id(root): root}  # values keep the copies alive, so ids stay unique

    def own(node: Any, key: str | int) -> Any:
        child = node[key]
        if id(child) not in owned:
            child = dict(child) if type(child) is dict else list(child)
            node[key] = child
            owned[id(child)] = child
        return child

    for op in ops:
        code, path = op[0], op[1]
        if code == SET and not path:
            root = dict(op[2])
            owned[id(root)] = root
            continue
        node = root
        for key in path if code in (APPEND, TRUNCATE, DROP_FRONT) else path[:-1]:
            node = own(node, key)
        if code == SET:
            node[path[-1]] = op[2]
        elif code == DELETE:
            del node[path[-1]]
        elif code == APPEND:
            node.extend(op[2])
        elif code == TRUNCATE:
            del node[op[2]:]
        elif code == DROP_FRONT:
            del node[: op[2]]
        else:
            raise ValueError(f"unknown delta op {code!r}")
    return root


def touched(memo: dict[tuple[str | int, ...], list[str]], ops: list[list[Any]]) -> None:
    """Forget the chunk hashes of every list an op changed other than by appending to it."""
    if not memo:
        return
    for op in ops:
        path = tuple(op[1])
        for key in list(memo):
            if op[0] == APPEND and path == key:
                continue
            if key[: len(path)] == path or path[: len(key)] == key:
                del memo[key]


# -- keyframes -------------------------------------------------------------------


def split_keyframe(
    state: dict[str, Any], memo: dict[tuple[str | int, ...], list[str]], new_blobs: dict[str, str]
) -> str:
    """The keyframe body for `state`; chunks not already in `memo` are added to `new_blobs`.

    `memo` maps a list's path to the hashes of its full chunks as of the last
    keyframe (kept valid by `touched`), so only new chunks are serialised.
    """
    if not _has_long_list(state):  # most states: the keyframe is the state, written at C speed
        return dumps_fast({"s": state})
    refs: list[list[Any]] = []

    def walk(node: Any, path: Path) -> Any:
        if isinstance(node, dict):
            return {key: walk(value, path + [key]) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            if len(node) > CHUNK_ITEMS:
                refs.append([path, _chunks(node, tuple(path), memo, new_blobs)])
                return None
            return [walk(item, path + [i]) for i, item in enumerate(node)]
        return node

    skeleton = walk(state, [])
    return dumps({"s": skeleton, "c": refs} if refs else {"s": skeleton})


def _has_long_list(state: dict[str, Any]) -> bool:
    """Whether a list longer than CHUNK_ITEMS lies anywhere in `state` (containers only are visited)."""
    stack: list[Any] = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(value for value in node.values() if isinstance(value, (dict, list, tuple)))
        elif len(node) > CHUNK_ITEMS:
            return True
        else:
            stack.extend(item for item in node if isinstance(item, (dict, list, tuple)))
    return False


def _chunks(items: Any, key: tuple[str | int, ...], memo: dict[tuple[str | int, ...], list[str]], new_blobs: dict[str, str]) -> list[str]:
    full = len(items) // CHUNK_ITEMS
    hashes = list(memo.get(key, [])[:full])
    for i in range(len(hashes), full):
        body = dumps(list(items[i * CHUNK_ITEMS : (i + 1) * CHUNK_ITEMS]))
        digest = content_hash(body)
        new_blobs[digest] = body
        hashes.append(digest)
    memo[key] = list(hashes)
    if len(items) % CHUNK_ITEMS:
        body = dumps(list(items[full * CHUNK_ITEMS :]))
        digest = content_hash(body)
        new_blobs[digest] = body
        hashes.append(digest)
    return hashes


def keyframe_hashes(body: dict[str, Any]) -> list[str]:
    """The chunk hashes a parsed keyframe body refers to."""
    return [digest for _, hashes in body.get("c", ()) for digest in hashes]


def join_keyframe(body: dict[str, Any], chunk: Callable[[str], list[Any]]) -> dict[str, Any]:
    """The state of a parsed keyframe body; `chunk(hash)` gives a chunk's items (not modified here)."""
    state: dict[str, Any] = body["s"]
    for path, hashes in body.get("c", ()):
        items: list[Any] = []
        for digest in hashes:
            items.extend(chunk(digest))
        _walk(state, path[:-1])[path[-1]] = items
    return state
