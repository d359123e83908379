"""Built-in loops shipped in the wheel, addressable by name (`loopterm run codefix`)."""

# name -> "module:variable"; the loader imports lazily so listing names costs nothing.
BUILTIN_LOOPS: dict[str, str] = {
    "codefix": "loopterm.examples.codefix.loop:loop",
}

# What `loopterm` with no arguments runs.
DEFAULT_LOOP = "codefix"
