"""Hypothesis strategies for tests/test_fuzz.py: hostile model replies, state edits, `--set` patches,
loop definition files and command lines.

Every strategy mixes the plausible (a nearly valid decision, a real field path) with the hostile
(markup, ANSI escapes, control characters, unpaired surrogates, NaN, 5,000-digit integers, JSON
nested hundreds deep, strings of hundreds of kilobytes), because a bug hides where a valid-looking
input carries one bad part.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from loopterm.core.decision import json_problem

# ----------------------------------------------------------------------------- text

MARKUP = [
    "[bold red]alarm[/bold red]", "[/]", "[link=file:///etc/passwd]click[/link]", "[@click=app.quit]x[/]",
    "[reverse]", "\\[escaped]", "[", "]", "[[", "]]",
]
ESCAPES = [
    "\x1b[31m", "\x1b[0m", "\x1b[2J\x1b[H", "\x1b]0;pwned\x07", "\x1b]8;;http://evil\x1b\\", "\x9b31m", "\x1bc",
    "\x07", "\x08\x08\x08", "\r", "\r\n", "\x00", "\x0b", "\x0c", "\x7f", "\x85", "\u2028", "\u2029",
    "\u202e", "\u2066", "\ufeff", "\u200b", "\ud800", "\udfff", "\udcff", "\U0001f600", "é", "中文", "\t",
]
JSONISH = ["{", "}", "```", "```json\n", "\n```", '"', "\\", "\\u0000", "\\ud800", "NaN", "Infinity", "-Infinity",
           "1e999", "null", "true", "[]", "{}", ",", ":"]
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
ANY_CHAR = st.one_of(st.characters(codec=None), SURROGATES, st.sampled_from(["\x1b", "\x00", "\r", "\n", "\x9b"]))


def valid_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Text a person or a model may legitimately write: any Unicode (controls and markup included), no surrogate."""
    return st.one_of(st.text(st.characters(codec="utf-8"), max_size=max_size),
                     st.lists(st.sampled_from(MARKUP + [e for e in ESCAPES if not 0xD800 <= ord(e[0]) <= 0xDFFF]),
                              max_size=3).map("".join))


def nasty_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Short hostile text: any code point (surrogates and controls included), markup, escapes, JSON shards."""
    piece = st.one_of(
        st.text(ANY_CHAR, max_size=max_size),
        st.sampled_from(MARKUP + ESCAPES + JSONISH),
        st.text(st.characters(codec="ascii"), max_size=max_size),
    )
    return st.lists(piece, max_size=4).map("".join)


def huge_text(max_len: int = 300_000) -> st.SearchStrategy[str]:
    """A long string built by repetition (cheap to generate): 1 KB .. max_len characters."""
    return st.builds(
        lambda unit, n: (unit * (n // max(1, len(unit)) + 1))[:n],
        st.one_of(nasty_text(8).filter(bool), st.just("x"), st.just("\x1b[31m")),
        st.integers(min_value=1_000, max_value=max_len),
    )


def any_text(max_len: int = 300_000) -> st.SearchStrategy[str]:
    return st.one_of(nasty_text(), nasty_text(), huge_text(max_len))


# ----------------------------------------------------------------------------- JSON

_RAW = "\u0000RAW{}\u0000"  # a placeholder replaced by a raw token after json.dumps

RAW_TOKENS = st.one_of(
    st.builds(lambda n: "9" * n, st.integers(4_000, 6_000)),  # beyond Python's int-string limit
    st.builds(lambda n: "1" + "0" * n, st.integers(19, 400)),  # beyond 64 bits
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "-0", "0.0", "1e-400"]),
    st.builds(lambda d: "[" * d + "]" * d, st.integers(1, 1_200)),  # deep lists
    st.builds(lambda d: '{"a":' * d + "1" + "}" * d, st.integers(1, 1_200)),  # deep objects
    st.builds(lambda d: "[" * d, st.integers(1, 100_000)),  # unterminated, very deep
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\u001b[31m"']),
)


def deep_value(depth: int, leaf: Any = 1) -> Any:
    """A list nested `depth` deep, built without recursion."""
    value: Any = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), nasty_text(20),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(nasty_text(8), children, max_size=4)),
    max_leaves=12,
)
hostile_values = st.one_of(
    json_values,
    st.builds(deep_value, st.integers(1, 400), json_leaves),
    huge_text(50_000),
)


@st.composite
def json_text(draw: st.DrawFn, value: st.SearchStrategy[Any] = hostile_values) -> str:
    """JSON text of a value, or a raw token JSON itself cannot produce (huge ints, NaN, deep nesting)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(RAW_TOKENS)
    return json.dumps(draw(value), allow_nan=True, ensure_ascii=draw(st.booleans()))


# ----------------------------------------------------------------------------- model replies

TOOLS = ("write", "note")


@st.composite
def decision_dict(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A decision that is valid, or valid but for one or more hostile parts; with raw tokens to splice."""
    raws: list[str] = []
    level = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 4, 8]))  # in 20ths: how likely each part is hostile

    def hostile(strategy: st.SearchStrategy[Any]) -> Any:
        if draw(st.sampled_from(range(20))) >= level:
            return draw(strategy)
        if draw(st.booleans()):
            raws.append(draw(RAW_TOKENS))
            return _RAW.format(len(raws) - 1)
        return draw(hostile_values)

    tool = hostile(st.sampled_from(TOOLS) if draw(st.sampled_from(range(8))) else nasty_text(30))
    if tool == "note":
        args = {"data": hostile(st.dictionaries(nasty_text(10), json_values, max_size=3)),
                "x": hostile(st.floats(allow_nan=False, allow_infinity=False, width=32))}
    else:
        args = {"text": hostile(any_text(50_000))}
    if level and draw(st.sampled_from(range(5))) == 0:
        args = hostile(st.dictionaries(nasty_text(10), json_values, max_size=3))
    action: Any = {"tool": tool, "args": args}
    if draw(st.sampled_from(range(7))) == 0:
        action = hostile(st.none())
    decision: dict[str, Any] = {
        "action": action,
        "subgoal": hostile(any_text(50_000)),
        "confidence": hostile(st.floats(min_value=0.0, max_value=1.0)),
        "reasoning": hostile(any_text(50_000)),
        "done": hostile(st.booleans()),
    }
    if level:
        for key in draw(st.lists(st.sampled_from(list(decision)), max_size=2, unique=True)):
            del decision[key]
    if draw(st.sampled_from(range(6))) == 0:
        decision[draw(nasty_text(10))] = draw(json_values)
    return decision, raws


@st.composite
def model_reply(draw: st.DrawFn) -> str:
    """What a model might send back: a (mostly) decision in JSON, wrapped, cut or spliced; or any text."""
    kind = draw(st.sampled_from(range(10)))
    if kind == 0:
        return draw(any_text())
    if kind == 1:
        return draw(json_text())
    decision, raws = draw(decision_dict())
    text = json.dumps(decision, allow_nan=True, ensure_ascii=draw(st.booleans()))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(i)), raw, 1)
    wrap = draw(st.sampled_from(range(10)))
    if wrap == 0:
        text = f"```json\n{text}\n```"
    elif wrap == 1:
        text = f"{draw(nasty_text())}{text}{draw(nasty_text())}"
    elif wrap == 2:
        text = text[: draw(st.integers(0, len(text)))]
    elif wrap == 3:
        text = text + text  # two objects
    return text


# ----------------------------------------------------------------------------- state edits and --set

STATE_PATHS = [
    "iteration", "schema_version", "task", "memory", "memory.subgoal", "memory.facts", "memory.facts.0",
    "memory.facts.1", "memory.contradictions", "memory.token_count", "memory.known", "memory.known.k",
    "memory.retrieved", "tool_results", "tool_results.0", "tool_results.0.args", "tool_results.0.args.text",
    "tool_results.0.output", "tool_results.0.ok", "tool_results.0.iteration", "invariant_status",
    "invariant_status.x", "last_gate_failure", "termination_reason", "surprise", "memory.facts.99999999999999999999",
    "memory.facts.\u00b2", "memory.facts.\u0661", "memory.facts.-1", "memory..facts", ".memory", "memory.", "",
    "tool_results.0.args.text.deeper", "task.0",
]


def plausible_patches() -> st.SearchStrategy[tuple[str, Any]]:
    """(path, value) a person could mean: a real field, a value of its type (any text inside)."""
    text = valid_text(60)
    return st.one_of(
        st.tuples(st.just("memory.subgoal"), text),
        st.tuples(st.just("task"), text),
        st.tuples(st.just("memory.facts"), st.lists(text, max_size=4)),
        st.tuples(st.just("memory.facts.0"), text),
        st.tuples(st.just("memory.token_count"), st.integers(0, 2**62)),
        st.tuples(st.just("memory.known"), st.dictionaries(text, text, max_size=3)),
        st.tuples(st.just("memory.known.k"), text),
        st.tuples(st.just("tool_results.0.args.text"), text),
        st.tuples(st.just("tool_results.0.args"), st.dictionaries(text, json_values.filter(lambda v: json_problem(v)
                                                                                           is None), max_size=3)),
        st.tuples(st.just("invariant_status.short_subgoal"), st.booleans()),
        st.tuples(st.just("last_gate_failure"), st.one_of(st.none(), text)),
        st.tuples(st.just("memory.contradictions"), st.lists(text, max_size=3)),
    )


@st.composite
def set_expr(draw: st.DrawFn) -> str:
    """A `--set PATH=JSON` argument: a real or broken path, and a JSON value or anything else."""
    if draw(st.booleans()):
        path, value = draw(plausible_patches())
        return f"{path}={json.dumps(value, ensure_ascii=draw(st.booleans()))}"
    path = draw(st.one_of(st.sampled_from(STATE_PATHS), st.sampled_from(STATE_PATHS), nasty_text(15)))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        value = draw(nasty_text())  # usually not JSON
    elif kind == 1:
        value = draw(RAW_TOKENS)
    else:
        value = json.dumps(draw(hostile_values), allow_nan=True, ensure_ascii=draw(st.booleans()))
    sep = draw(st.sampled_from(["=", "=", "=", "", "==", " = "]))
    return f"{path}{sep}{value}"


def set_at(data: dict[str, Any], path: list[Any], value: Any) -> None:
    """Best-effort assignment (for building edits): silently does nothing where the path does not fit."""
    node: Any = data
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        pass


@st.composite
def state_edit(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """An edited copy of a state dump: a few paths replaced by hostile values (keys added or dropped)."""
    data = json.loads(json.dumps(base))
    if draw(st.booleans()):  # what a person means to do: real fields, values of their types
        for path, value in draw(st.lists(plausible_patches(), min_size=1, max_size=3)):
            set_at(data, [int(p) if p.isdigit() else p for p in path.split(".")], value)
        return data
    for _ in range(draw(st.integers(1, 4))):
        path = [int(p) if p.isdigit() else p for p in draw(st.sampled_from(STATE_PATHS[:24])).split(".")]
        choice = draw(st.integers(0, 3))
        if choice == 0:
            value = draw(json_values)
        elif choice == 1:
            value = draw(hostile_values)
        elif choice == 2:
            value = draw(st.sampled_from([float("nan"), float("inf"), "\ud800", {"\udfff": 1}, 10**30, -1, None]))
        else:
            value = draw(nasty_text())
        set_at(data, path, value)
    if draw(st.integers(0, 6)) == 0:
        data.pop(draw(st.sampled_from(sorted(data))), None)
    return data


def edit_json(value: Any, raws: list[str] | None = None) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


# ----------------------------------------------------------------------------- loop files

_VALID_LOOP_HEADER = "from loopterm.core import Loop, LoopState, tool\n"

PRELUDES = [
    "", "", "", "import sys\n", "raise ValueError('boom \\x1b[31mred\\nsecond line')\n", "1/0\n",
    "import sys\nsys.exit(3)\n", "raise SystemExit('bye')\n", "raise SystemExit\n",
    "def f(n):\n    return f(n + 1)\nf(0)\n", "class Odd(BaseException):\n    pass\nraise Odd('not an Exception')\n",
    "import asyncio\nraise asyncio.CancelledError()\n", "raise GeneratorExit\n", "x = (\n", "def broken(:\n",
    "import no_such_module_for_loopterm_fuzz\n", "from . import sibling\n", "raise MemoryError\n",
    "raise RecursionError('deep')\n", "exec('def g(:')\n", "assert False, 'x' * 100000\n",
    "raise Exception('\\x00\\x07\\r\\x9b')\n", "raise ValueError('\\ud800')\n",
    "import os\n", "raise KeyError('\\n'.join(['k'] * 50))\n",
    "__name__ = 5\n", "del tool\n",
]

NAMES = ["'ok'", "'ok-2'", "''", "'   '", "None", "123", "'\\x1b[31mred'", "'a' * 100000", "'\\ud800'",
         "'[bold]x[/bold]'", "'new\\nline'", "'../../etc'", "'x/y'", "'x:y'", "['list']"]
GOALS = ["'make flag.txt say ok'", "''", "None", "42", "'g' * 1_000_000", "'\\x00\\x1b[2J'", "'\\ud800'",
         "'line\\n' * 1000", "b'bytes'", "{'a': 1}"]
MAX_ITERATIONS = ["2", "0", "-1", "'many'", "10 ** 100", "1.5", "True", "None", "float('nan')", "2 ** 63"]
TOOL_LISTS = ["[]", "[write]", "[write, write]", "[1]", "'write'", "None", "[lambda: 1]", "[write, note]"]
STATES = ["LoopState", "int", "dict", "None", "'LoopState'", "Custom", "Bad"]
EXTRAS = ["", "", "frobnicate=1", "max_repairs=-1", "stall_window=1", "budget={'usd': -1}", "budget='lots'",
          "temperature=float('inf')", "model=5", "model='\\x1b[31m'", "gates=[1]", "invariants='x'",
          "tool_history=0", "script='/no/such/script.json'"]
VARIABLES = ["loop", "loop", "my_loop", "_private", "loop2"]

_TOOLS_SRC = '''
@tool
def write(text: str) -> str:
    """Write."""
    return text


@tool
def note(data: dict, x: float = 0.0) -> str:
    """Note."""
    return "ok"


class Custom(LoopState):
    extra: list[int] = []


class Bad:
    pass
'''


VALID = {"name": ["'ok'", "'ok-2'", "'a.b_c'"], "goal": ["'make flag.txt say ok'", "'g' * 1_000_000", "'\\x1b[2J [b]'"],
         "max_iterations": ["2", "10", "2 ** 40"], "tools": ["[]", "[write]", "[write, note]"],
         "state": ["LoopState", "Custom"]}


@st.composite
def loop_file(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(source bytes, variable name to ask for or None): a loop definition file, broken more often than not."""
    broken = draw(st.booleans())

    def pick(valid: list[str], anything: list[str]) -> str:
        return draw(st.sampled_from(anything if broken and draw(st.sampled_from(range(3))) == 0 else valid))

    parts = [_VALID_LOOP_HEADER if not broken or draw(st.sampled_from(range(10)))
             else draw(st.sampled_from(["", "import loopterm\n"]))]
    parts.append(draw(st.sampled_from(PRELUDES)) if broken else "")
    parts.append(_TOOLS_SRC)
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        fields = {key: pick(VALID[key], everything)
                  for key, everything in (("name", NAMES), ("goal", GOALS), ("max_iterations", MAX_ITERATIONS),
                                          ("tools", TOOL_LISTS), ("state", STATES))}
        fields["model"] = "'scripted/x'"
        if broken:
            for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
                if key != "model":
                    fields.pop(key)
        args = ", ".join(f"{k}={v}" for k, v in fields.items())
        extra = pick([""], EXTRAS)
        call = f"Loop({args}{', ' + extra if extra else ''})"
        parts.append(f"{pick(['loop'], VARIABLES)} = {call}\n")
    if broken and draw(st.sampled_from(range(6))) == 0:
        parts.append(draw(nasty_text(30)).replace("\x00", ""))  # trailing junk (often a syntax error)
    source = "".join(parts)
    encoding = draw(st.sampled_from(range(10))) if broken else 9
    if encoding == 0:
        data = source.encode("utf-8", "surrogatepass") + b"\n\xff\xfe bad bytes\n"
    elif encoding == 1:
        data = b"\xef\xbb\xbf" + source.encode("utf-8", "surrogatepass")
    elif encoding == 2:
        data = source.encode("utf-8", "surrogatepass").replace(b"\n", b"\x00\n", 1)
    else:
        data = source.encode("utf-8", "surrogatepass")
    name = None if not broken or draw(st.booleans()) else draw(st.one_of(
        st.sampled_from(VARIABLES + ["write", "Custom", "nope", "1bad", "a-b", ""]), nasty_text(10)))
    return data, name
