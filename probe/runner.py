"""One run, driven from the coordinator: the trio shell around the engine.

Everything that decides the run is in ``udpreach.core.sweep.Sweep``; this only performs its
actions and feeds it events, with the time: it encodes and hands datagrams to the sender in
batches (never an ``await`` per datagram), asks the agent to flush its receipts and waits
for the answer in a task of its own, sleeps (or spins, for waits shorter than trio's timer
resolution) until the engine's next deadline, checkpoints the ledger to the store in a
worker thread (a slow or failing disk never stalls sending), and reports progress.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from probe.sender import IDLE_GUARD, BindSender, IcmpEvent, route_mtu
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.document import never_started
from udpreach.core.errors import AgentUnavailableError
from udpreach.core.ledger import compress_snapshot
from udpreach.core.plan import Plan
from udpreach.core.sweep import (
    Checkpoint,
    Finished,
    Flush,
    Send,
    Sweep,
    SweepSettings,
    Wait,
)


class AgentSession(Protocol):
    """What a run needs of a registered agent (``probe.coordinator.AgentSession`` is one;
    tests may drive a run with their own)."""

    name: str
    registered: str
    observed: str
    ports: tuple[int, ...]
    lost: trio.Event
    sink: Callable[[bytes], None] | None

    async def send(self, body: Any) -> None: ...

    async def expect(
        self, mtype: str, within: float, check: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]: ...


log = logging.getLogger("udpreach.runner")

Progress = Callable[[dict[str, Any]], Awaitable[None]]
REPLY_TIMEOUT = 10.0
PROGRESS_EVERY = 0.1
TICK_EVERY = 10.0  # a one-way "still here" to the agent during long runs
SPIN_BELOW = 0.001  # waits shorter than this are spun: trio's timers are not that fine
YIELD_EVERY = 0.004  # while spinning or sending, let other tasks in this often
PREPARE_SLICE = 0.0005  # spare sockets are opened this long at a time between checkpoints
SPARE_SECONDS = 0.25  # bind mode: spare sockets for this much of the coming sends at most


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _work_ahead(sweep: Sweep, until: float, clock: Callable[[], float]) -> bool:
    """Do the engine's work ahead (``Sweep.prepare``) until ``clock()`` reaches ``until``
    or none is left; returns whether any is left."""
    more = True
    while more and clock() < until:
        more = sweep.prepare()
    return more


class RunExecution:
    """Executes one plan against one registered agent."""

    def __init__(
        self,
        *,
        session: AgentSession,
        plan: Plan,
        secret: bytes,
        source: str,
        target: str,
        progress: Progress,
        store: Any = None,
        warnings: list[str] | None = None,
        sender_factory: Callable[[str, str, float], Any] | None = None,
        rate_cap: Callable[[], float] | None = None,
        settings: SweepSettings | None = None,
        seed: int | None = None,
    ) -> None:
        self.session = session
        self.plan = plan
        self.secret = secret
        self.source = source
        self.target = target
        self.progress = progress
        self.store = store
        self.warnings = list(warnings or [])
        self._sender_factory = sender_factory or (
            lambda src, dst, linger: BindSender(src, dst, linger=linger)
        )
        self.settings = settings or SweepSettings()
        self.rate_cap = rate_cap
        self.seed = secrets.randbits(64) if seed is None else seed
        self.run_id = new_run_id()
        self.send_mode = "bind"
        self.started = time.time()
        self.sweep: Sweep | None = None
        self._wake = trio.Event()
        self._cancelled = False
        self._cancel_why: str | None = None
        self._store_busy = False
        self._sender: Any = None

    def cancel(self, why: str | None = None) -> None:
        """Stop the run as soon as possible; ``execute`` then returns the incomplete
        document (cells not yet settled are ``unknown``), saying ``why`` (by default, that
        its requester cancelled it)."""
        self._cancelled = True
        if why is not None:
            self._cancel_why = why
        self._wake.set()

    # -- the run ------------------------------------------------------------------------------

    async def execute(self) -> dict[str, Any]:
        """Run the plan; returns the run document (complete or not).

        Raises only for cancellation; a lost agent gives an incomplete document.
        """
        sender = None
        sweep: Sweep | None = None
        doc: dict[str, Any] = {}
        try:
            # The sender first: the stored run must say which send mode it ran in.
            sender = self._sender = self._sender_factory(self.source, self.target, 0.05)
            self.send_mode = str(getattr(sender, "mode", "bind"))
            await self._store("begin", self.run_id, started=self.started,
                              plan=self.plan.to_json(), agent=self._agent_json(),
                              probe=self._probe_json())  # fmt: skip
            sweep = await self._start()
            await self._drive(sweep, sender)
        except AgentUnavailableError as exc:
            if sweep is None:
                self.warnings.append(str(exc))
            else:
                sweep.on_agent_lost(str(exc), trio.current_time())
            log.warning("run %s: %s", self.run_id, exc)
        finally:
            # Also when cancelled (the requester went away): the run is stored as it ended.
            with trio.move_on_after(5, shield=True):
                if sender is not None:
                    if sweep is not None:
                        now = trio.current_time()
                        sweep.on_icmp(sender.reap(now, everything=True), now)
                    sender.close()
                await self._end_on_agent(sweep)
                doc = self._document(sweep)
                if not await self._store("finish", self.run_id, doc):
                    doc["warnings"].append(
                        "the run could not be stored in the probe's database (see the probe's "
                        "log); this document is the only copy"
                    )
        return doc

    def _document(self, sweep: Sweep | None) -> dict[str, Any]:
        if sweep is None:  # the agent never started the run: nothing was sent
            return never_started(
                run_id=self.run_id,
                agent=self._agent_json(),
                probe=self._probe_json(),
                plan=self.plan,
                started=self.started,
                warnings=self.warnings,
            )
        if not sweep.finished:
            sweep.abort("the run was stopped", trio.current_time())
        return sweep.document(
            agent=self._agent_json(),
            probe=self._probe_json(),
            started=self.started,
            finished=time.time(),
        )

    async def _drive(self, sweep: Sweep, sender: Any) -> None:
        codec = sweep.codec
        encode = codec.encode_block
        session = self.session
        clock = trio.current_time
        next_progress = next_tick = 0.0
        last_yield = clock()
        # The sender's waits between paced sends go to the engine's work ahead too.
        sender.idle = lambda until: _work_ahead(sweep, until, time.perf_counter)
        async with trio.open_nursery() as nursery:
            while True:
                now = clock()
                # Nothing is raised in here (a nursery would wrap it in a group): a lost
                # agent is an event for the engine, which then finishes the run.
                if session.lost.is_set():
                    sweep.on_agent_lost(f"agent {session.name!r} was lost during the run", now)
                if self._cancelled:
                    if self._cancel_why is None:
                        sweep.cancel(now)
                    else:
                        sweep.abort(self._cancel_why, now)
                if self.rate_cap is not None:
                    sweep.rate_cap = self.rate_cap()
                sender.linger = sweep.linger()
                sender.spare_wanted = sweep.sources_ahead(SPARE_SECONDS)
                sender.trim_spares()
                events = sender.reap(now)
                if events:
                    sweep.on_icmp(events, now)
                act = sweep.next_action(now)
                if isinstance(act, Send):
                    # A socket per source port (bind mode): never past the sender's share of
                    # the file descriptor limit; wait for the oldest to be reaped instead.
                    need = max((len(srcs) for _, _, srcs in act.groups), default=0)
                    while sender.free_slots() < need and sender.oldest_age(clock()) > 0:
                        await trio.sleep(max(0.001, sender.linger - sender.oldest_age(clock())))
                        sweep.on_icmp(sender.reap(clock()), clock())
                    now = clock()
                    batch = [(d, srcs, encode(d, srcs, attempt)) for d, attempt, srcs in act.groups]
                    if act.spacing:
                        results = sender.send_cells(batch, now, pace=(act.burst, act.spacing))
                    else:
                        results = sender.send_cells(batch, now)
                    sweep.on_sent(act, results, clock())
                elif isinstance(act, Flush):
                    if act.final:
                        sweep.on_icmp(sender.reap(now, everything=True), now)
                    if await self._send(sweep, {"type": "flush", "seq": act.seq}):
                        nursery.start_soon(self._await_flush, sweep, act.seq)
                elif isinstance(act, Wait):
                    if sender.spare_room() > 0:
                        # Bind mode: open spare sockets for the next sends, a slice at a
                        # time, other tasks (the agent's replies) let in after each.
                        sender.prepare(min(act.until, now + PREPARE_SLICE), clock)
                        await trio.lowlevel.checkpoint()
                        last_yield = clock()
                        continue
                    if act.until - now > IDLE_GUARD and _work_ahead(
                        sweep, min(act.until - IDLE_GUARD, now + PREPARE_SLICE), clock
                    ):
                        # The engine's work ahead (the first round's MACs), the same way.
                        await trio.lowlevel.checkpoint()
                        last_yield = clock()
                        continue
                    if act.until - now < SPIN_BELOW:
                        if now - last_yield >= YIELD_EVERY:
                            await trio.lowlevel.checkpoint()
                            last_yield = clock()
                        continue  # spin: the next batch is due within a millisecond
                    self._wake = trio.Event()
                    with trio.move_on_at(act.until):
                        await self._wake.wait()
                    last_yield = clock()
                elif isinstance(act, Checkpoint):
                    self._checkpoint(sweep, nursery)
                elif isinstance(act, Finished):
                    break
                now = clock()
                if now >= next_progress:
                    next_progress = now + PROGRESS_EVERY
                    if now >= next_tick:
                        # Keep a slow run's agent from taking the silence for a dead coordinator.
                        next_tick = now + TICK_EVERY
                        await self._send(sweep, {"type": "tick"})
                    await self.progress(sweep.progress(now))
                    last_yield = clock()
                elif now - last_yield >= YIELD_EVERY:
                    await trio.lowlevel.checkpoint()
                    last_yield = clock()
            nursery.cancel_scope.cancel()

    async def _send(self, sweep: Sweep, body: dict[str, Any]) -> bool:
        """Send to the agent; a lost agent is the engine's news, never an exception here."""
        try:
            await self.session.send(body)
        except AgentUnavailableError as exc:
            sweep.on_agent_lost(str(exc), trio.current_time())
            return False
        return True

    async def _await_flush(self, sweep: Sweep, seq: int) -> None:
        try:
            body = await self.session.expect(
                "flushed", REPLY_TIMEOUT, lambda b: b.get("seq") == seq
            )
        except AgentUnavailableError as exc:
            sweep.on_agent_lost(str(exc), trio.current_time())
        else:
            stats = body.get("stats")
            sweep.on_flushed(seq, trio.current_time(), stats if isinstance(stats, dict) else None)
        self._wake.set()

    def _checkpoint(self, sweep: Sweep, nursery: trio.Nursery) -> None:
        """Store the ledger in a worker thread; skipped while the last one is still going."""
        if self.store is None or self._store_busy:
            return
        parts = sweep.ledger.snapshot_parts()  # a copy: compressed off the event loop
        self._store_busy = True
        store, run_id = self.store, self.run_id

        async def write() -> None:
            try:
                await self._off_loop(
                    "checkpoint", lambda: store.checkpoint(run_id, compress_snapshot(parts))
                )
            finally:
                self._store_busy = False

        nursery.start_soon(write)

    async def _store(self, what: str, *args: Any, **kwargs: Any) -> bool:
        """One store call in a worker thread; False (and a log line) if it failed."""
        if self.store is None:
            return True
        call = getattr(self.store, what)
        return await self._off_loop(what, lambda: call(*args, **kwargs))

    async def _off_loop(self, what: str, work: Callable[[], object]) -> bool:
        """``work`` (a store call) in a worker thread; False (and a log line) if it failed."""
        try:
            await trio.to_thread.run_sync(work)
        except Exception as exc:  # the run and its document go on whatever the disk does
            log.error("run %s: could not %s it in the store: %s", self.run_id, what, exc)
            return False
        return True

    async def _start(self) -> Sweep:
        nonce_c = secrets.token_bytes(16)
        t0 = trio.current_time()
        await self.session.send(
            {
                "type": "run_start",
                "run_id": self.run_id,
                "nonce": nonce_c.hex(),
                "size": self.plan.size,
                "dst_ports": list(self.plan.dst_ports),
            }
        )
        body = await self.session.expect(
            "run_ready", REPLY_TIMEOUT, lambda b: b.get("run_id") == self.run_id
        )
        now = trio.current_time()
        rtt = max(0.0005, now - t0)
        try:
            nonce_a = bytes.fromhex(str(body.get("nonce", "")))
        except ValueError:
            nonce_a = b""
        if len(nonce_a) != 16:
            raise AgentUnavailableError("agent sent a malformed run_ready")
        key = derive_run_key(self.secret, self.run_id, nonce_c, nonce_a)
        settings = SweepSettings(
            **{
                **self.settings.__dict__,
                "control_rtt": rtt,
                "header_bytes": 48 if ":" in self.target else 28,
            }
        )
        sweep = Sweep(
            self.plan,
            TokenCodec(key, self.plan.size),
            now=now,
            seed=self.seed,
            settings=settings,
            run_id=self.run_id,
            source=self.source,
            target=self.target,
            warnings=self.warnings,
        )
        self.sweep = sweep
        sweep.route_mtu = getattr(self._sender, "path_mtu", None) or route_mtu(
            self.target, ":" in self.target
        )

        def sink(payload: bytes) -> None:
            sweep.on_receipts(payload, trio.current_time())
            self._wake.set()  # the engine's next deadline may have moved (the UDP delay)

        self.session.sink = sink
        log.info(
            "run %s: %d cells to %s (%s) from %s",
            self.run_id,
            self.plan.cells,
            self.session.name,
            self.target,
            self.source,
        )
        return sweep

    async def _end_on_agent(self, sweep: Sweep | None) -> None:
        """Tell the agent the run is over and take its last statistics."""
        session = self.session
        session.sink = None
        if session.lost.is_set():
            return
        try:
            await session.send({"type": "run_end", "run_id": self.run_id})
            body = await session.expect("run_done", 2.5, lambda b: b.get("run_id") == self.run_id)
        except (AgentUnavailableError, trio.TooSlowError):
            return
        if sweep is not None and isinstance(body.get("stats"), dict):
            sweep.facts.agent_stats = body["stats"]

    def _agent_json(self) -> dict[str, Any]:
        s = self.session
        return {
            "name": s.name,
            "registered": s.registered,
            "observed": s.observed,
            "ports": list(s.ports),
        }

    def _probe_json(self) -> dict[str, Any]:
        return {"address": self.source, "target": self.target, "send_mode": self.send_mode}


__all__ = ["IcmpEvent", "RunExecution", "new_run_id"]
