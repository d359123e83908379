"""Engines this window drives: loading a run's loop, checking its model, starting and owning engines."""

from __future__ import annotations

import asyncio

from loopterm.core import runlog
from loopterm.core import runs as service
from loopterm.core.control import (
    Command,
    Stop,
)
from loopterm.core.engine import Engine
from loopterm.core.errors import LooptermError
from loopterm.core.liveness import alive, executing_elsewhere
from loopterm.core.loop import Loop
from loopterm.core.records import RunRecord
from loopterm.tui.screens.side_effect import SideEffectScreen
from loopterm.tui.view import FINISHED, EngineNotice
from loopterm.tui.widgets.render import clean
from rich.text import Text


class Driving:
    """Mixed into LooptermApp: the engines it owns, as workers."""

    # ------------------------------------------------------------------ loops and engines

    def loop_for(self, run: RunRecord) -> Loop | None:
        """The run's loop definition (loaded once per ref); None when it cannot be loaded here."""
        ref = run.loop_ref
        if ref not in self._loops:
            try:
                from loopterm.core.loader import load_loop

                self._loops[ref] = load_loop(ref)[0]
            except Exception as exc:
                self._loops[ref] = None
                self._loop_errors[ref] = str(exc)
        return self._loops[ref]

    def _loop_or_say(self, run: RunRecord, doing: str) -> Loop | None:
        loop = self.loop_for(run)
        if loop is None:
            why = self._loop_errors.get(run.loop_ref, "")
            self.notify(f"cannot {doing}: loop {run.loop_ref!r} does not load here ({why})", severity="error",
                        timeout=10, markup=False)
        return loop

    async def _model_ready(self, loop: Loop, model: str, *, starting: bool = False) -> bool:
        """Check the model before a run starts (registers the offline script) and load its tokenizer, all in
        threads: importing litellm takes seconds, the tokenizer ~0.3 s, and the screen must stay live.
        `starting`: no run is on screen yet, so the header says which of these it waits for."""
        from loopterm.core.model import litellm_loaded, load_litellm, warm_tokenizer

        def say(what: str) -> None:
            if starting and self.view is None:
                self._header_note = Text(what, style="italic")
                self.update_header()

        try:
            if loop.agent is not None:  # a coding agent is the actor: no model library, only its program
                say("checking the agent …")
                await asyncio.to_thread(service.preflight_model, loop, model)
                return True
            if not litellm_loaded():
                say("loading the model library …")
                await asyncio.to_thread(load_litellm)
            say(f"checking model {clean(model)} …")
            await asyncio.to_thread(service.preflight_model, loop, model,
                                    loop.script if model.startswith("scripted/") else None)
            await asyncio.to_thread(warm_tokenizer, model)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            if starting:
                self.start_error = str(exc)
            return False
        return True

    async def _launch(self, loop: Loop, ref: str) -> None:
        """Start the run this window was opened for; every slow step runs in a thread, the header says which."""
        model = self.model or loop.model
        if not await self._model_ready(loop, model, starting=True):
            self._header_note = Text(f"could not start {loop.name}: {clean(self.start_error or 'see the message')}",
                                     style="bold red")
            self.update_header()
            return
        if self.view is None:
            self._header_note = Text("preparing the workspace …", style="italic")
            self.update_header()
        try:  # records the run and copies the loop's files into its workspace
            engine = await asyncio.to_thread(
                service.create, loop, self.store, ref=ref, model=model, max_iterations=self.max_iterations,
                budget=self.budget or {}, workspace_root=self.workspace_root, shadow=self.shadow, wait_on_person=True)
        except (LooptermError, OSError) as exc:  # a bad budget, a workspace that cannot be written
            self.start_error = str(exc)
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            self._header_note = Text(f"could not start {loop.name}: {clean(exc)}", style="bold red")
            self.update_header()
            return
        self.own(engine)
        self.refresh_tree()
        self.show_run(engine.run_id)

    def own(self, engine: Engine) -> None:
        """Drive an engine in an App-owned worker; its events arrive as EngineNotice messages."""
        self.engines[engine.run_id] = engine
        engine.subscribe(lambda event: self.post_message(EngineNotice(event)))
        if self.otlp:
            from loopterm.tui.traces import follow

            follow(self, engine)
        self.run_worker(self._drive(engine), name=f"engine {engine.run_id}", group="engines", exit_on_error=False)

    async def _drive(self, engine: Engine) -> None:
        try:
            await engine.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a loop's own code: say so, keep the screen
            self.notify(f"run {engine.run_id} crashed: {exc.__class__.__name__}: {exc}", severity="error", timeout=15,
                        markup=False)
        finally:
            self.engines.pop(engine.run_id, None)
            self._starting.discard(engine.run_id)
            if not self._quitting:
                self.refresh_tree()
                self.poll_soon()

    def executing(self, run_id: str) -> bool:
        """Whether an engine (this window's, or another process's) is executing the run now."""
        if run_id in self.engines or run_id in self._starting:
            return True
        try:
            run = self.store.get_run(run_id)
        except KeyError:
            return False
        if run.status in FINISHED or run.status == "created":
            return False
        if not alive(run):  # a stale heartbeat: whatever executed it is gone (killed, crashed)
            return False
        return executing_elsewhere(run, self.run_view(run_id))

    def resume_here(self, run_id: str, first: Command | None = None) -> None:
        """Start an engine in this window for a run that nothing executes (optionally with a first command,
        which the engine takes before anything else: the answer to what it waits on, a step, a stop).

        A run that stopped on a side effect it may repeat asks the person first (reuse or execute again).
        """
        if run_id in self._starting or run_id in self.engines:
            return
        run = self.store.get_run(run_id)
        if run.status == "converged":
            self.notify(f"run {run_id[:8]} converged: branch (b) from an iteration to continue it", severity="warning")
            return
        loop = self._loop_or_say(run, "resume it here")
        if loop is None:
            return
        stopping = isinstance(first, Stop)  # it only records the answer and ends: nothing runs, nothing is spent
        pending = self.run_view(run_id).side_effect
        if pending is not None and not stopping:
            key = pending.asked.key

            def answered(answer: str | None) -> None:
                if answer is not None:
                    self.store.append_event(run_id, runlog.SideEffectAnswered(key=key, answer=answer))
                    self._start_engine(run, loop, first, {key: answer})

            self.push_screen(SideEffectScreen(run_id, pending.asked), callback=answered)
            return
        self._start_engine(run, loop, first, None, checks=not stopping)

    def _start_engine(self, run: RunRecord, loop: Loop, first: Command | None, answers: dict[str, str] | None,
                      *, checks: bool = True) -> None:
        if run.id in self._starting or run.id in self.engines:
            return
        self._starting.add(run.id)
        if first is not None:
            self.send(run.id, first, quiet=True)
        self.run_worker(self._resume(run, loop, answers, checks=checks), name=f"resume {run.id}", group="launch",
                        exit_on_error=False)

    def _continuing(self, run_id: str, loop: Loop, what: str, answers: dict[str, str] | None = None) -> Engine | None:
        """The engine that continues a run from this screen, through the run service's gates (the daily budget
        of `loopterm resume` and `fork`); None, said, when one refuses."""
        try:
            engine, note = service.continuing(self.store, loop, self.store.get_run(run_id), what=what, checked=True,
                                              side_effect_answers=answers or {}, wait_on_person=True)
        except LooptermError as exc:
            self.notify(str(exc), severity="error", timeout=15, markup=False)
            return None
        if note:
            self.notify(note, timeout=6, markup=False)
        return engine

    async def _resume(self, run: RunRecord, loop: Loop, answers: dict[str, str] | None = None, *,
                      checks: bool = True) -> None:
        """`checks`: the model and the daily budget are checked first (not for an engine started only to take
        a stop: it calls no model)."""
        try:
            if checks and not await self._model_ready(loop, run.model):
                return
            if checks:
                engine = self._continuing(run.id, loop, "what this run may still spend", answers)
            else:
                engine = service.engine_for(self.store, loop, self.store.get_run(run.id),
                                            side_effect_answers=answers or {}, wait_on_person=True)
            if engine is None:
                return
            self.own(engine)
            if checks:
                self.notify(f"run {run.id[:8]} continues in this window", timeout=3)
        finally:
            self._starting.discard(run.id)
        self.refresh_tree()
        self.poll_soon()

