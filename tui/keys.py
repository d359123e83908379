"""Keys as people write them, and the user's ``[keymap]`` applied to loopterm's bindings.

Every loopterm binding has an id (``tui/bindings.py``, the screens); ``config.toml``'s
``[keymap]`` maps ids to keys (see ``loopterm.tui.config``). Here the entries are checked
against the bindings that exist and against what Textual can bind, then handed to
``App.set_keymap``; every unusable entry is one warning line naming its id.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from textual.app import App
from textual.binding import Binding, BindingType
from textual.dom import DOMNode
from textual.keys import Keys, format_key, key_to_character

__all__ = [
    "MODIFIERS",
    "apply_user_keymap",
    "binding_ids",
    "check_keymap",
    "current_keymap",
    "effective_keys",
    "is_valid_key",
    "key_display",
]

MODIFIERS = frozenset({"ctrl", "alt", "shift", "meta", "super", "hyper"})
_KEY_NAMES = frozenset(key.value for key in Keys)
# Words people write where Textual's footer would draw a glyph.
_SPELLED = {"enter": "enter", "backspace": "backspace"}


def _split(key: str) -> tuple[list[str], str]:
    """``"ctrl+shift+a"`` -> (["ctrl", "shift"], "a"); a lone ``+`` is the plus key."""
    if len(key) == 1:
        return [], key
    head, _, name = key.rpartition("+")
    if not name and head.endswith("+"):  # "ctrl++": ctrl and the plus key
        head, name = head[:-1], "+"
    return (head.split("+") if head else []), name  # "ctrl+" has no key: name is ""


def key_display(keys: str) -> str:
    """Keys as people write them: ``question_mark`` -> ``?``, ``slash`` -> ``/``, ``ctrl+s`` stays ``ctrl+s``.

    Comma-separated keys come back as ``"esc, ?"``. Built on Textual's ``format_key``, but modifiers
    keep their names (Textual's footer would write ``^s``).
    """
    shown: list[str] = []
    for key in keys.split(","):
        key = key.strip()
        if not key:
            continue
        modifiers, name = _split(key)
        name = _SPELLED.get(name) or format_key(name)
        shown.append("+".join([*modifiers, name]))
    return ", ".join(shown)


def is_valid_key(key: str) -> bool:
    """Whether Textual can bind ``key`` ("B", "?", "ctrl+n", "f5", "question_mark"; not "ctrl+", "nn", "hyperx+a")."""
    key = key.strip()
    if not key:
        return False
    modifiers, name = _split(key)
    if any(modifier not in MODIFIERS for modifier in modifiers):
        return False
    if len(name) == 1:
        return name.isprintable() and not name.isspace()
    return name in _KEY_NAMES or key_to_character(name) is not None or format_key(name) != name


def _loopterm_classes() -> Iterator[type[DOMNode]]:
    """Every App, Screen and Widget class loopterm defines (those imported so far)."""
    seen: set[type] = set()
    stack: list[type] = [DOMNode]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                if sub.__module__.startswith("loopterm."):
                    yield sub


def _bindings_of(cls: type[DOMNode]) -> Iterator[Binding]:
    """The bindings ``cls`` has, its bases' included (a subclass inherits them)."""
    for klass in cls.__mro__:
        spec: Iterable[BindingType] = klass.__dict__.get("BINDINGS", ())
        for binding in spec:
            if isinstance(binding, Binding):
                yield binding


def binding_ids() -> dict[str, list[tuple[str, Binding]]]:
    """binding id -> [(where it is bound: a class name, the binding)], over loopterm's classes."""
    ids: dict[str, list[tuple[str, Binding]]] = {}
    for cls in _loopterm_classes():
        for binding in _bindings_of(cls):
            if binding.id:
                ids.setdefault(binding.id, []).append((cls.__name__, binding))
    return ids


def effective_keys(binding: Binding, keymap: dict[str, str]) -> str:
    """The key(s) ``binding`` answers to under ``keymap`` (its own key when the keymap leaves it alone)."""
    return keymap.get(binding.id or "", binding.key) if binding.id else binding.key


def check_keymap(entries: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The usable entries, and one warning line per unknown id, bad key, or key taken from another binding."""
    known = binding_ids()
    usable: dict[str, str] = {}
    warnings: list[str] = []
    for binding_id, keys in entries.items():
        if binding_id not in known:
            warnings.append(f"keymap: unknown binding id {binding_id!r} ignored (the ids are listed in the README)")
            continue
        bad = [key.strip() for key in keys.split(",") if not is_valid_key(key)]
        if bad:
            warnings.append(f"keymap: {binding_id} = {keys!r} ignored: {bad[0]!r} is not a key "
                            '(write keys like "B", "?", "ctrl+n", "f5"; several as "ctrl+n,n")')
            continue
        usable[binding_id] = keys
    # A remapped key that another binding of the same screen still uses: the remapped one wins there.
    for cls in _loopterm_classes():
        holders: dict[str, list[str]] = {}
        for binding in _bindings_of(cls):
            if binding.id and not binding.system:
                for key in effective_keys(binding, usable).split(","):
                    holders.setdefault(_long_name(key), []).append(binding.id)
        for key, ids in holders.items():
            ids = list(dict.fromkeys(ids))
            remapped = [i for i in ids if i in usable and key in {_long_name(k) for k in usable[i].split(",")}]
            if len(ids) > 1 and remapped:
                others = ", ".join(i for i in ids if i != remapped[0])
                line = f"keymap: {remapped[0]} = {usable[remapped[0]]!r} takes {key_display(key)} from {others}"
                if line not in warnings:
                    warnings.append(line)
    return usable, warnings


def _long_name(key: str) -> str:
    """The name Textual matches a key by ("?" -> "question_mark"), for comparing keys."""
    key = key.strip()
    modifiers, name = _split(key)
    if len(name) == 1 and not name.isalnum():
        from textual.keys import _character_to_key  # the same normalisation App.set_keymap applies

        name = _character_to_key(name)
    return "+".join([*modifiers, name])


def apply_user_keymap(app: App[Any], directory: Any = None) -> list[str]:
    """Read ``[keymap]`` from config.toml, apply what is usable with ``app.set_keymap``; the warnings."""
    from loopterm.tui.config import keymap_entries, load_settings

    settings = load_settings(directory)  # a corrupt file is reported once, with the theme's warnings
    entries, problems = keymap_entries(settings)
    usable, more = check_keymap(entries)
    if usable:
        app.set_keymap(usable)
    return [*problems, *more]


def current_keymap(app: App[Any]) -> dict[str, str]:
    """The keymap ``app`` applies (Textual keeps it, normalised, in ``App._keymap``)."""
    keymap = getattr(app, "_keymap", None)
    return dict(keymap) if isinstance(keymap, dict) else {}
