"""The main screen's key bindings: each has an id (a user keymap can rebind it) and a tooltip."""

from __future__ import annotations

from textual.binding import Binding

SUPERVISION_BINDINGS: list[Binding] = [
    Binding("space", "app.toggle_pause", "Pause/resume", id="pause",
            tooltip="Pause the run at its next iteration boundary, or let a paused run continue (a run waiting on "
                    "its escalation opens it instead: r there answers it)"),
    Binding("n", "app.step", "Step", id="step", tooltip="Run exactly one iteration, then pause"),
    Binding("e", "app.edit_state", "Edit state", id="edit_state",
            tooltip="Edit the state the next iteration starts from (JSON, validated against the loop's state model)"),
    Binding("i", "app.relax", "Relax", id="relax",
            tooltip="Relax or restore an invariant, with a reason, optionally for the next N iterations"),
    Binding("b", "app.branch", "Branch", id="branch",
            tooltip="Branch from the selected iteration: patches, why, invariants to relax, model, running or paused"),
    Binding("c", "app.compare", "Compare", id="compare",
            tooltip="Compare two runs side by side: c marks the run on screen (⇄ in the tree), c on another run "
                    "compares the pair; c twice on a branch compares it with its parent"),
    Binding("a", "app.approve", "Approve", id="approve",
            tooltip="Approve the tool call waiting for a person (arguments editable)"),
    Binding("d", "app.deny", "Deny", id="deny", tooltip="Deny the tool call waiting for a person"),
    Binding("p", "app.policies", "Policies", id="policies",
            tooltip="Approval policies of the run on screen and its loop (made from the approval dialog); r revokes one"),
    Binding("x", "app.inbox", "Escalations", id="inbox", tooltip="Runs across the database waiting on a person"),
    Binding("t", "app.toggle_tree", "Runs tree", id="toggle_tree",
            tooltip="Show or hide the runs tree (hidden by default below 110 columns; your choice then holds)"),
    Binding("slash", "app.search", "Search", id="search",
            tooltip="Search the reasoning trail: filter the timeline to iterations whose reasoning or subgoal match"),
    Binding("r", "app.resume", "Resume", id="resume",
            tooltip="Let the run continue, past its pending escalation if it has one (that is the answer); a run "
                    "nothing executes (stopped, escalated, crashed) starts in this window"),
    Binding("s", "app.stop", "Stop", id="stop",
            tooltip="Stop the run at its next iteration boundary (it stays resumable)"),
    Binding("question_mark", "app.help", "Help", id="help", tooltip="Every key binding"),
    Binding("q", "app.quit", "Quit", id="quit",
            tooltip="Quit; runs started here stop at their next boundary and stay resumable (what waits on a person "
                    "stays in the inbox)"),
]
SEARCH_CLOSE = Binding("escape", "app.close_search", "Close search", id="close_search", show=False,
                       tooltip="Clear the search and show every iteration")

