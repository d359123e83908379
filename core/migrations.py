"""State schema migrations: pure functions v(n) -> v(n+1), applied when an older snapshot is loaded.

A loop declares them as `Loop(migrations={1: v1_to_v2, 2: v2_to_v3})` and bumps
its state class's VERSION. Snapshots are never rewritten in the store; they are
migrated on the way out (show, fork, resume, replay).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopterm.core.errors import ConfigError

if TYPE_CHECKING:
    from loopterm.core.loop import Loop


def migrate_state(loop: "Loop", data: dict[str, Any]) -> dict[str, Any]:
    """Bring a stored state dict up to the loop's current state version."""
    target = loop.state.VERSION
    version = int(data.get("schema_version", 1))
    if version > target:
        raise ConfigError(
            f"a stored state is schema v{version} but loop {loop.name!r} knows only up to v{target}; "
            "use the newer loop definition"
        )
    while version < target:
        step = loop.migrations.get(version)
        if step is None:
            raise ConfigError(
                f"loop {loop.name!r} has no migration from state v{version} to v{version + 1}; "
                f"add migrations={{{version}: ...}} to the Loop"
            )
        try:
            data = step(dict(data))
        except Exception as exc:
            raise ConfigError(f"state migration v{version} -> v{version + 1} of loop {loop.name!r} failed: "
                              f"{exc.__class__.__name__}: {exc}") from None
        version += 1
        data["schema_version"] = version
    return data
