"""The built-in `demo` loop: every supervision feature of loopterm in about a minute, with no key."""
