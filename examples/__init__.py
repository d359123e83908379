"""Built-in loops shipped in the wheel, addressable by name (`loopterm run demo`)."""

# name -> "module:variable"; the loader imports lazily so listing names costs nothing.
BUILTIN_LOOPS: dict[str, str] = {
    "demo": "loopterm.examples.demo.loop:loop",
    "codefix": "loopterm.examples.codefix.loop:loop",
    "review": "loopterm.examples.review.loop:loop",
    "review-file": "loopterm.examples.review.analyze:loop",
    "support": "loopterm.examples.support.loop:loop",
    "mcp-git": "loopterm.examples.mcp_git.loop:loop",
    "agent-fix": "loopterm.examples.agent_fix.loop:loop",
}

# What `loopterm` with no arguments runs: the demo shows every supervision feature offline.
DEFAULT_LOOP = "demo"
