"""Reflexive with a final critic pass: command gates first, then a critic has the last word."""

from pathlib import Path

from loopterm.core import CommandGate
from loopterm.core.roles import Role
from loopterm.core.topology import reflexive
from loopterm.examples.codefix.tools import write_file

loop = reflexive(
    name="haiku",
    goal="Write a haiku about tide pools to poem.txt: three lines, nothing else.",
    tools=[write_file],
    gates=[CommandGate(name="three_lines", argv=["{python}", "-c",
                       "import sys; sys.exit(len(open('poem.txt').read().strip().splitlines()) != 3)"])],
    critic=Role(name="critic", system_prompt="You are a poetry editor. Count syllables: 5, 7, 5."),
    script=Path(__file__).with_name("reflexive.json"),
    max_iterations=4,
)
