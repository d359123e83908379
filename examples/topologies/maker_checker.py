"""Maker-checker: a release note drafted by one prompt profile, checked by another."""

from pathlib import Path

from loopterm.core.roles import Role
from loopterm.core.topology import maker_checker
from loopterm.examples.codefix.tools import write_file

loop = maker_checker(
    name="release-note",
    goal="Write NOTES.md: the release note for version 2.1 (it drops Python 3.9 and adds `--parallel`).",
    tools=[write_file],
    checker=Role(name="checker", system_prompt="You review release notes for a careful user. Be strict."),
    instructions="Fail it if a breaking change is missing or is not marked as breaking.",
    script=Path(__file__).with_name("maker_checker.json"),  # offline; --model openai/gpt-4o-mini for a real one
    max_iterations=4,
)
