"""Find and load loop definitions: built-in names and `path/to/file.py[:name]`.

Every failure is a ConfigError whose message is one line saying what is wrong
and what to do, because the CLI prints it as-is and exits 2. `load_loop` also
returns a canonical ref, stored with each run so `loopterm resume` and
`loopterm fork` can load the very same definition again from any directory.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import itertools
import re
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel, ValidationError

from loopterm.core.errors import ConfigError
from loopterm.core.loop import Loop
from loopterm.core.loop_checks import check_loop_file, explain_validation_error
from loopterm.core.text import first_line, one_line

_MAX_LINE = 400  # longest error message we print; a loop file's exception can be huge
_IMPORT_LOCK = threading.Lock()  # sys.path is process-global while a loop file imports
_COUNTER = itertools.count(1)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LoopInfo(BaseModel):
    """One row of `loopterm loops`: enough to choose a loop, or to see why a file is broken."""

    name: str  # the Loop's name, or the file's stem when it failed to load
    ref: str  # what to pass to `loopterm run`
    source: str  # "built-in" or the file's path
    goal: str = ""  # first line of the goal
    description: str = ""  # the loop's one line (its description, else the goal's first line)
    topology: str = ""
    model: str = ""
    error: str | None = None  # one line when the file failed to load


def builtin_loops() -> dict[str, str]:
    """The registry of built-in loops (name -> "module:variable"), imported lazily."""
    from loopterm.examples import BUILTIN_LOOPS

    return dict(BUILTIN_LOOPS)


def load_loop(ref: str) -> tuple[Loop, str]:
    """Load a loop from a built-in name or `path/to/file.py[:name]`; return it and its canonical ref."""
    try:
        return _load_loop(ref)
    except ConfigError as exc:  # whatever part of it came from the person's input or the file, one line
        raise ConfigError(one_line(str(exc), 1_000)) from None


def _load_loop(ref: str) -> tuple[Loop, str]:
    ref = (ref or "").strip()
    if not ref:
        raise ConfigError("no loop given; pass a built-in name (see `loopterm loops`) or path/to/file.py[:name]")
    builtins = builtin_loops()
    if ref in builtins:
        return _load_builtin(ref, builtins[ref]), ref
    path_text, name = _split_ref(ref)
    if name is not None and path_text in builtins and not Path(path_text).exists():
        raise ConfigError(f"built-in loop {path_text!r} takes no ':{name}'; run it as `loopterm run {path_text}`")
    if name is None and not _looks_like_path(path_text):
        raise ConfigError(_unknown_builtin_message(ref, builtins))
    try:
        path = Path(path_text).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        path = path.resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a loop of symlinks
        raise ConfigError(f"loop file {_ref_shown(path_text)} cannot be opened: {_os_reason(exc)}; check the path") from None
    loops = _loops_in_file(path, shown=path_text)
    chosen_name, loop = _choose(loops, name, shown=path_text)
    _check(loop, path_text)
    return loop, f"{path}:{chosen_name}"


def list_loops(search_dirs: list[Path] | None = None) -> list[LoopInfo]:
    """Built-ins first, then loops in ./loops/*.py and ./.loopterm/loops/*.py; broken files listed, not raised."""
    if search_dirs is None:
        search_dirs = default_search_dirs()
    infos: list[LoopInfo] = []
    for name, target in builtin_loops().items():
        try:
            loop = _load_builtin(name, target)
        except ConfigError as exc:
            infos.append(LoopInfo(name=name, ref=name, source="built-in", error=str(exc)))
            continue
        infos.append(_info(loop, name, "built-in"))
    seen: set[Path] = set()
    for directory in search_dirs:
        if not directory.is_dir():
            continue
        for file in sorted(directory.glob("*.py")):
            if file.name.startswith("_") or not file.is_file():
                continue  # __init__.py and private helpers are not loops
            resolved = file.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            infos.extend(_infos_for_file(file, resolved))
    return infos


def default_search_dirs(cwd: Path | None = None) -> list[Path]:
    """Where `loopterm loops` looks for loop files: ./loops and ./.loopterm/loops."""
    base = cwd or Path.cwd()
    return [base / "loops", base / ".loopterm" / "loops"]


# --- internals -------------------------------------------------------------------------------


def _split_ref(ref: str) -> tuple[str, str | None]:
    """Split `file.py:name`; a Windows drive (`C:\\x.py`) is not a name."""
    head, sep, tail = ref.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail:
        return ref, None
    if not tail:
        raise ConfigError(f"loop ref {ref!r} ends with ':'; give the variable name after it, e.g. {head}:loop")
    if not _IDENT.match(tail):
        raise ConfigError(f"{tail!r} in loop ref {ref!r} is not a Python variable name; use path/to/file.py:name")
    return head, tail


def _looks_like_path(text: str) -> bool:
    return text.endswith(".py") or "/" in text or "\\" in text or text.startswith(("~", "."))


def _ref_shown(ref: str, limit: int = 120) -> str:
    """A ref as the person typed it, quoted, cut short (the advice after it must stay on the line)."""
    return repr(ref) if len(ref) <= limit else repr(ref[:limit]) + f"... ({len(ref):,} characters)"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return " ".join(str(exc).split())[:200] or exc.__class__.__name__


def _unknown_builtin_message(ref: str, builtins: dict[str, str]) -> str:
    known = ", ".join(sorted(builtins)) or "none"
    close = difflib.get_close_matches(ref, list(builtins), n=1) if len(ref) <= 200 else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"unknown loop {_ref_shown(ref)}: {hint}built-in loops are {known}; "
        "run `loopterm loops` to list them, or give a loop file as path/to/file.py[:name]"
    )


def _load_builtin(name: str, target: str) -> Loop:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken install, not the person's input; still one line
        raise ConfigError(
            f"built-in loop {name!r} failed to import ({module_name}): {_describe(exc)}; reinstall loopterm"
        ) from None
    loop = getattr(module, attr or "loop", None)
    if not isinstance(loop, Loop):
        raise ConfigError(f"built-in loop {name!r} is not a Loop ({target}); reinstall loopterm")
    return loop


def _loops_in_file(path: Path, shown: str) -> dict[str, object]:
    """Import the file and return its module-level variables (ConfigError if it cannot be imported)."""
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ConfigError(f"loop file {_ref_shown(shown)} cannot be opened: {_os_reason(exc)}; check the path") from None
    if not exists:
        raise ConfigError(f"loop file {shown} not found (looked at {path}); check the path, or run `loopterm loops`")
    if path.is_dir():
        raise ConfigError(f"loop file {shown} is a directory; give the .py file that defines the Loop")
    if path.suffix != ".py":
        raise ConfigError(f"loop file {shown} is not a .py file; a loop is defined in a Python file")
    module = _import_file(path, shown)
    return dict(vars(module))


def _import_file(path: Path, shown: str) -> ModuleType:
    """Import a loop file under a unique module name, with its directory on sys.path only meanwhile."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_loopterm_loopfile_{stem}_{digest}_{next(_COUNTER)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"loop file {shown} cannot be imported as a Python module; check that it is a .py file")
    module = importlib.util.module_from_spec(spec)
    directory = str(path.parent)
    with _IMPORT_LOCK:
        # Registered before running so pydantic and dataclasses can resolve the file's own annotations.
        sys.modules[module_name] = module
        sys.path.insert(0, directory)
        try:
            spec.loader.exec_module(module)
        except KeyboardInterrupt:  # ctrl-c while the file imports: an interruption, not the file's error
            sys.modules.pop(module_name, None)
            raise
        except BaseException as exc:  # SystemExit, asyncio.CancelledError, a BaseException of the file's own
            sys.modules.pop(module_name, None)
            raise ConfigError(_import_failure(exc, path, shown)) from None
        finally:
            try:
                sys.path.remove(directory)  # removes our entry (the first occurrence)
            except ValueError:
                pass
    return module


def _import_failure(exc: BaseException, path: Path, shown: str) -> str:
    where = _line_in_file(exc, path)
    if isinstance(exc, ValidationError):
        what = "Loop" if exc.title == "Loop" else exc.title
        errors = exc.errors()
        clearer = explain_validation_error(exc.title, errors[0]) if errors else None
        if clearer is not None:
            return one_line(f"loop file {shown}{where}: {clearer}", _MAX_LINE)
        return one_line(
            f"loop file {shown} defines an invalid {what}{where}: {_first_validation_error(exc)}; "
            f"fix the {what}(...) call", _MAX_LINE
        )
    return one_line(f"loop file {shown} failed to import{where}: {_describe(exc)}; fix the file and try again", _MAX_LINE)


def _line_in_file(exc: BaseException, path: Path) -> str:
    """' (line N)' for the innermost frame of the loop file itself, so the person knows where to look."""
    if isinstance(exc, SyntaxError):
        return ""  # the line is already in the SyntaxError's description
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        try:
            same = Path(frame.f_code.co_filename).resolve() == path
        except (OSError, ValueError):
            same = False
        if same:
            line = lineno
    return f" (line {line})" if line is not None else ""


def _describe(exc: BaseException) -> str:
    """'ExceptionClass: message', with SyntaxError's position kept short."""
    if isinstance(exc, SyntaxError):
        position = f" (line {exc.lineno})" if exc.lineno else ""
        return one_line(f"{exc.__class__.__name__}: {exc.msg}{position}", _MAX_LINE)
    if isinstance(exc, ValidationError):
        return one_line(f"invalid {exc.title}: {_first_validation_error(exc)}", _MAX_LINE)
    message = str(exc)
    return one_line(f"{exc.__class__.__name__}: {message}" if message else exc.__class__.__name__, _MAX_LINE)


def _first_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return one_line(str(exc), _MAX_LINE)
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "(definition)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return one_line(f"{loc}: {first.get('msg', 'invalid')}{more}", _MAX_LINE)


def _choose(variables: dict[str, object], name: str | None, shown: str) -> tuple[str, Loop]:
    """Pick the Loop named `name`, else `loop`, else the only Loop in the file."""
    loops = {k: v for k, v in variables.items() if isinstance(v, Loop)}
    listed = ", ".join(sorted(loops)) or "none"
    if name is not None:
        if name not in variables:
            raise ConfigError(f"loop file {shown} has no variable {name!r}; Loops defined there: {listed}")
        value = variables[name]
        if not isinstance(value, Loop):
            raise ConfigError(
                f"{name!r} in loop file {shown} is a {type(value).__name__}, not a Loop; Loops defined there: {listed}"
            )
        return name, value
    if isinstance(variables.get("loop"), Loop):
        return "loop", variables["loop"]  # type: ignore[return-value]
    distinct = {id(v): k for k, v in sorted(loops.items(), reverse=True)}  # first name wins for aliases
    if not distinct:
        raise ConfigError(
            f"loop file {shown} defines no Loop; create one at module level, e.g. loop = Loop(name=..., goal=..., ...)"
        )
    if len(distinct) > 1:
        first = sorted(loops)[0]
        raise ConfigError(f"loop file {shown} defines several Loops ({listed}); pick one, e.g. {shown}:{first}")
    chosen = next(iter(distinct.values()))
    return chosen, loops[chosen]


def _check(loop: Loop, shown: str) -> None:
    """A loaded file's Loop passes the checks a loop file is held to (see loop_checks.py)."""
    try:
        check_loop_file(loop)
    except ConfigError as exc:
        raise ConfigError(f"loop file {shown}: {exc}") from None


def _infos_for_file(file: Path, resolved: Path) -> list[LoopInfo]:
    """Every Loop a discovered file defines, or one row carrying its error."""
    shown = _display_path(file)
    try:
        variables = _loops_in_file(resolved, shown)
        loops = {k: v for k, v in variables.items() if isinstance(v, Loop)}
        if len({id(v) for v in loops.values()}) <= 1:
            name, loop = _choose(variables, None, shown)  # raises "defines no Loop" for none
            loops = {name: loop}
        else:  # several: one row each, an alias listed under its first name only
            firsts = {id(v): k for k, v in sorted(loops.items(), reverse=True)}
            loops = {k: loops[k] for k in firsts.values()}
        for loop in loops.values():
            _check(loop, shown)
    except ConfigError as exc:
        return [LoopInfo(name=file.stem, ref=shown, source=shown, error=str(exc))]
    return [_info(loop, f"{shown}:{var}", shown) for var, loop in sorted(loops.items())]


def _info(loop: Loop, ref: str, source: str) -> LoopInfo:
    goal = first_line(loop.goal)
    return LoopInfo(name=loop.name, ref=ref, source=source, goal=goal, model=loop.model,
                    description=one_line(loop.description, _MAX_LINE) if loop.description else goal, topology=loop.topology)


def _display_path(file: Path) -> str:
    """Relative to the working directory when possible: short, and still a valid ref there."""
    try:
        return str(file.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(file.resolve())
