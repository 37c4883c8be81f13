"""One run, driven from the coordinator: plan -> rounds of sending -> settle -> verdicts.

The trio shell around the sync core: it asks the ledger what is still unresolved, asks the
codec for datagrams, hands them to the sender in batches (never an ``await`` per datagram),
paces with the ``Pacer``, and after each round waits for the path to drain and for the agent
to flush its receipts (a round trip on the ordered control channel, so every receipt the
agent holds is in the ledger before the round is judged). Rounds stop when nothing is
unresolved or the loss estimate says further copies cannot change a verdict.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from probe.sender import BindSender, IcmpEvent
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.document import build_document
from udpreach.core.errors import AgentUnavailableError, ProtocolError
from udpreach.core.framing import RECEIPT, decode_receipts
from udpreach.core.ledger import IcmpInfo, Ledger
from udpreach.core.loss import LossEstimate, attempts_needed, estimate_loss
from udpreach.core.pacing import PILOT_CELLS, Pacer
from udpreach.core.plan import Plan, RunLifecycle

if TYPE_CHECKING:
    from probe.coordinator import AgentSession

log = logging.getLogger("udpreach.runner")

Progress = Callable[[dict[str, Any]], Awaitable[None]]
BATCH_SECONDS = 0.004  # send about this much per batch before a checkpoint
MAX_BATCH_GROUPS = 4096  # so a batch is BATCH_SECONDS long even at a full-speed sweep
BATCH_BYTES = 4 * 1024 * 1024  # and no batch holds more than this (large --size)
REPLY_TIMEOUT = 10.0
PROGRESS_EVERY = 0.1
PORT_UNREACHABLE = ((3, 3), (1, 4))  # ICMP, ICMPv6
CHECKPOINT_EVERY = 2.0  # seconds between store checkpoints in the middle of a round
FIRST_CHECKPOINT = 1.0  # seconds into a run before the first mid-round checkpoint
RETRY_LOSS_LIMIT = 0.25  # per-round loss above which retries slow down
MIN_EVIDENCE = 50  # cells first seen in a round before its loss ratio means anything
TICK_EVERY = 10.0  # a one-way "still here" to the agent during long rounds
MAX_REQUEUES = 8  # per source port and round; then what is left waits for the next round


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class _Window:
    rate: float
    sent: int = 0
    delivered: int = 0
    end: float = 0.0


@dataclass
class RunFacts:
    """What the runner learnt, beyond the ledger."""

    rounds: int = 0
    max_attempt: int = 0
    loss: LossEstimate | None = None
    stale_receipts: int = 0
    malformed_batches: int = 0
    icmp_errors: int = 0
    agent_stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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
        rng: random.Random | None = None,
        sender_factory: Callable[[str, str, float], Any] | None = None,
        max_datagrams: int | None = None,
        rate_cap: Callable[[], float] | None = None,
    ) -> None:
        self.session = session
        self.plan = plan
        self.secret = secret
        self.source = source
        self.target = target
        self.progress = progress
        self.store = store
        self.run_id = new_run_id()
        self.ledger = Ledger(plan.dst_ports, plan.src_ports)
        self.lifecycle = RunLifecycle()
        self.facts = RunFacts(warnings=list(warnings or []))
        self.pacer = Pacer(ceiling=float(plan.rate))
        self.rng = rng or random.Random(secrets.randbits(64))
        self._sender_factory = sender_factory or (
            lambda src, dst, linger: BindSender(src, dst, linger=linger)
        )
        self.max_datagrams = max_datagrams
        self.rate_cap = rate_cap
        self.send_mode = "bind"
        self._codec: TokenCodec | None = None
        self._round = 0
        self._win_of_np = np.full(65536, -1, dtype=np.int32)  # source port -> its window
        self._windows: list[_Window] = []
        self._requeues: dict[int, int] = {}  # source port -> times requeued this round
        self._next_progress = 0.0
        self._next_checkpoint = 0.0
        self._next_tick = 0.0
        self._flush_seq = 0
        self.rtt = 0.005
        self.started = time.time()
        self._cancel_scope = trio.CancelScope()

    def cancel(self) -> None:
        """Stop the run as soon as possible; ``execute`` then returns the incomplete
        document (cells not yet settled are ``unknown``)."""
        self._cancel_scope.cancel()

    # -- receipts (called synchronously by the session's reader task) --------------------

    def on_receipts(self, payload: bytes) -> None:
        try:
            run_id, addrs, recs = decode_receipts(payload)
        except ProtocolError:
            self.facts.malformed_batches += 1
            return
        if run_id != self.run_id:
            self.facts.stale_receipts += len(recs) // RECEIPT.size
            return
        fresh = self.ledger.note_receipts_packed(recs, addrs, self._round)
        if len(fresh):  # cells first seen in this round: the pacer's delivery count
            wins = self._windows
            of = self._win_of_np[fresh]
            of = of[(of >= 0) & (of < len(wins))]
            if len(of):
                counts = np.bincount(of)
                for w in np.flatnonzero(counts).tolist():
                    wins[w].delivered += int(counts[w])

    # -- control-channel helpers ----------------------------------------------------------

    async def _flush(self) -> None:
        self._flush_seq += 1
        seq = self._flush_seq
        await self.session.send({"type": "flush", "seq": seq})
        body = await self.session.expect("flushed", REPLY_TIMEOUT, lambda b: b.get("seq") == seq)
        stats = body.get("stats")
        if isinstance(stats, dict):
            self.facts.agent_stats = stats

    async def _report(self, force: bool = False) -> None:
        now = trio.current_time()
        if not force and now < self._next_progress:
            return
        self._next_progress = now + PROGRESS_EVERY
        led = self.ledger
        if now >= self._next_tick:
            # Keep a slow run's agent from taking the silence for a dead coordinator.
            self._next_tick = now + TICK_EVERY
            await self.session.send({"type": "tick"})
        if self.store is not None and now >= self._next_checkpoint:
            # Mid-round too: a coordinator killed in a long round keeps what it settled.
            # Bounded to ~5% of the time: compressing 16 ports' arrays takes a few 10 ms.
            t0 = time.perf_counter()
            self.store.checkpoint(self.run_id, led.snapshot())
            self._next_checkpoint = now + max(CHECKPOINT_EVERY, 20 * (time.perf_counter() - t0))
        await self.progress(
            {
                "type": "progress",
                "run_id": self.run_id,
                "round": self._round,
                "cells": led.cells,
                "settled": led.settled,
                "open": led.open,
                "sent": led.sent_total,
                "rate": round(self.pacer.rate),
            }
        )

    # -- the run ----------------------------------------------------------------------------

    async def execute(self) -> dict[str, Any]:
        """Run the plan; returns the run document (complete or not).

        Raises only for cancellation; a lost agent gives an incomplete document.
        """
        complete = False
        sender = None
        try:
            if self.store is not None:
                self.store.begin(
                    self.run_id,
                    started=self.started,
                    plan=self.plan.to_json(),
                    agent=self._agent_json(),
                    probe=self._probe_json(self.send_mode),
                )
            with self._cancel_scope:
                await self._start()
                linger = max(0.05, 4 * self.rtt)
                sender = self._sender_factory(self.source, self.target, linger)
                self.send_mode = str(getattr(sender, "mode", "bind"))
                await self._rounds(sender)
                complete = True
            if self._cancel_scope.cancelled_caught:
                self.facts.warnings.append("the run was cancelled by its requester")
        except* AgentUnavailableError as group:
            # From _send_round's nursery it arrives wrapped in an ExceptionGroup.
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            self.facts.warnings.append(str(exc))
            log.warning("run %s: %s", self.run_id, exc)
        finally:
            with trio.move_on_after(3, shield=True) as scope:
                scope.shield = True
                if sender is not None:
                    self._apply_icmp(sender.reap(0.0, everything=True))
                    sender.close()
                self.session.sink = None
                if not self.session.lost.is_set():
                    try:
                        await self.session.send({"type": "run_end", "run_id": self.run_id})
                        body = await self.session.expect(
                            "run_done", 2.5, lambda b: b.get("run_id") == self.run_id
                        )
                        if isinstance(body.get("stats"), dict):
                            self.facts.agent_stats = body["stats"]
                    except (AgentUnavailableError, trio.TooSlowError):
                        pass
            if not complete and self.session.lost.is_set():
                # The agent's host answers "port unreachable" once the agent is dead: that is
                # the agent gone, not the path rejecting.
                n = self.ledger.unsettle_icmp(
                    lambda i: i.sender == self.target and (i.type, i.code) in PORT_UNREACHABLE
                )
                if n:
                    self.facts.warnings.append(
                        f"{n} cells drew port-unreachable from {self.target} after the agent "
                        "went away; they are unknown"
                    )
            if not self.lifecycle.finished:
                self.lifecycle.move("finish" if complete else "abort")
            self.ledger.finish(complete=complete)
            doc = self.document(complete)
            if self.store is not None:
                self.store.finish(self.run_id, doc)
        return doc

    def _agent_json(self) -> dict[str, Any]:
        s = self.session
        return {
            "name": s.name,
            "registered": s.registered,
            "observed": s.observed,
            "ports": list(s.ports),
        }

    def _probe_json(self, mode: str) -> dict[str, Any]:
        return {"address": self.source, "target": self.target, "send_mode": mode}

    async def _start(self) -> None:
        nonce_c = secrets.token_bytes(16)
        t0 = trio.current_time()
        self.session.sink = self.on_receipts
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
        self.rtt = max(0.0005, trio.current_time() - t0)
        # No mid-round checkpoint in the first seconds: a short sweep is checkpointed at the
        # end of its rounds only.
        self._next_checkpoint = trio.current_time() + FIRST_CHECKPOINT
        try:
            nonce_a = bytes.fromhex(str(body.get("nonce", "")))
        except ValueError:
            nonce_a = b""
        if len(nonce_a) != 16:
            raise AgentUnavailableError("agent sent a malformed run_ready")
        key = derive_run_key(self.secret, self.run_id, nonce_c, nonce_a)
        self._codec = TokenCodec(key, self.plan.size)
        log.info(
            "run %s: %d cells to %s (%s) from %s",
            self.run_id,
            self.plan.cells,
            self.session.name,
            self.target,
            self.source,
        )

    def _cells_to_send(self, attempt: int) -> tuple[list[int], dict[int, list[int]]]:
        """The cells still owed attempt number ``attempt``.

        Returns:
            the source ports, and for those that do not go to every planned destination
            port, the destination ports they go to (usually empty: a source port's cells
            tend to share their fate).
        """
        led = self.ledger
        dsts = self.plan.dst_ports
        owed: dict[int, list[int]] = {}
        for d in dsts:
            owed[d] = led.owed_srcs(d, attempt)
        first = owed[dsts[0]]
        if all(owed[d] == first for d in dsts[1:]):
            return list(first), {}
        only: dict[int, list[int]] = {}
        for d in dsts:
            for s in owed[d]:
                only.setdefault(s, []).append(d)
        full = len(dsts)
        return list(only), {s: ds for s, ds in only.items() if len(ds) != full}

    async def _rounds(self, sender: Any) -> None:
        plan = self.plan
        led = self.ledger
        self.lifecycle.move("send")
        if plan.cells >= 16 * PILOT_CELLS and plan.rate > self.pacer.pilot_rate:
            await self._pilot(sender)
        attempt = 0
        opened_before = 0  # cells first seen in the previous round
        while True:
            attempt += 1
            srcs, only = self._cells_to_send(attempt)
            if not srcs:
                break
            need = len(srcs) * len(plan.dst_ports) - sum(
                len(plan.dst_ports) - len(ds) for ds in only.values()
            )
            if self.max_datagrams is not None and led.sent_total + need > self.max_datagrams:
                self.facts.warnings.append(
                    f"stopped after {attempt - 1} attempt(s) per cell: another round would pass "
                    f"the probe's ceiling of {self.max_datagrams} datagrams per run"
                )
                break
            if self.lifecycle.phase.value == "settling":
                self.lifecycle.move("send")
            self._round = attempt
            self.facts.rounds += 1
            self.facts.max_attempt = attempt
            srcs = self._shuffled(srcs)
            t0 = trio.current_time()
            open_at_start = led.open if attempt > 1 else 0
            # Only the first round sends to a random sample of the whole plan, so only there
            # does the pilot's delivery ratio apply; retries go to a population that is mostly
            # blocked and keep the rate the first round found.
            await self._send_round(sender, srcs, only, attempt, self.pacer.rate, judge=attempt == 1)
            t1 = trio.current_time()
            self.lifecycle.move("settle")
            await self._settle(sender)
            log.debug(
                "run %s round %d: sent %d groups in %.3fs, settled in %.3fs (rate now %d/s)",
                self.run_id,
                attempt,
                len(srcs),
                t1 - t0,
                trio.current_time() - t1,
                self.pacer.rate,
            )
            opened = led.open - open_at_start
            if attempt > 1:
                self._retry_backoff(opened, opened_before)
            opened_before = opened
            if self.store is not None:
                self.store.checkpoint(self.run_id, led.snapshot())
            await self._report(force=True)
            remaining = led.unresolved_count()
            est = estimate_loss(led.first_attempt_histogram())
            self.facts.loss = est
            if remaining == 0:
                break
            needed = attempts_needed(est, plan.confidence, plan.copies, floor=min(2, plan.copies))
            log.info(
                "run %s round %d: %d unresolved, loss %.3f (<= %.3f), %d attempts needed",
                self.run_id,
                attempt,
                remaining,
                est.estimate,
                est.upper,
                needed,
            )
            if attempt >= needed:
                break
        if self.lifecycle.phase.value == "sending":
            self.lifecycle.move("settle")

    def _retry_backoff(self, opened: int, opened_before: int) -> None:
        """Slow down for the next round when this round's retries show heavy loss.

        Open cells still unseen lose each attempt with the path's loss rate p, so the cells
        first seen in round k+1 number about p times those first seen in round k, whatever
        share of the plan is blocked (blocked cells are never seen). A ratio above
        ``RETRY_LOSS_LIMIT`` means the retries themselves are being lost: at this rate a
        limiter on the path would keep cells unseen until the copies run out, so halve it.
        """
        if opened_before < MIN_EVIDENCE:
            return
        p_round = opened / opened_before
        if p_round > RETRY_LOSS_LIMIT:
            new = max(self.pacer.floor, self.pacer.rate / 2)
            if new < self.pacer.rate:
                log.info(
                    "run %s: retries show %.0f%% loss per attempt; slowing to %d/s",
                    self.run_id,
                    100 * p_round,
                    new,
                )
                self.pacer.rate = new
                self.pacer.backoffs += 1

    def _shuffled(self, srcs: list[int]) -> list[int]:
        """``srcs`` in a random order drawn from the run's rng (numpy's permutation:
        random.shuffle is a Python loop, about 40 ms for a full sweep)."""
        order = np.random.default_rng(self.rng.getrandbits(64)).permutation(len(srcs))
        shuffled: list[int] = np.asarray(srcs)[order].tolist()
        return shuffled

    async def _pilot(self, sender: Any) -> None:
        """Send attempt 1 to a random sample at a gentle rate: the reference delivery ratio."""
        led = self.ledger
        srcs = list(self.plan.src_ports)
        per = len(self.plan.dst_ports)
        k = max(1, PILOT_CELLS // per)
        sample = self.rng.sample(srcs, min(k, len(srcs)))
        self._round = 1
        await self._send_round(sender, list(sample), {}, 1, self.pacer.pilot_rate, judge=False)
        await self._settle(sender)
        delivered = sum(
            1 for s in sample for d in self.plan.dst_ports if led.verdict(d, s) == "open"
        )
        sent = sum(led.attempts(d, s) for s in sample for d in self.plan.dst_ports)
        self.pacer.set_reference(delivered, sent, self.pacer.pilot_rate)

    async def _send_round(
        self,
        sender: Any,
        srcs: list[int],
        only: dict[int, list[int]],
        attempt: int,
        start_rate: float,
        *,
        judge: bool = True,
    ) -> None:
        """Send one attempt to the given cells; while sending, judge finished windows.

        ``srcs`` are the source ports in sending order; each goes to every planned
        destination port unless ``only`` names the ones it goes to.
        """
        self._windows = [_Window(start_rate)]
        self._requeues = {}
        async with trio.open_nursery() as nursery:
            if judge:
                nursery.start_soon(self._judge_windows)
            await self._send_loop(sender, srcs, only, attempt, start_rate, judge)
            nursery.cancel_scope.cancel()
        self._windows[-1].end = trio.current_time()

    async def _judge_windows(self) -> None:
        """Judge windows only once the agent has provably reported on them.

        A flush is a round trip on the ordered control channel: when its answer arrives,
        every datagram that reached the agent before the flush request did is in the ledger.
        So a window that ended one path-delay before the request was sent is complete, however
        far behind a busy agent is; judging by the clock instead would mistake a slow agent
        for a lossy path.
        """
        judged = 0
        while True:
            await trio.sleep(0.02)
            t_sent = trio.current_time()
            await self._flush()
            windows = self._windows
            while judged < len(windows) - 1 and windows[judged].end + self.rtt <= t_sent:
                w = windows[judged]
                self.pacer.on_window(w.rate, w.sent, w.delivered)
                judged += 1

    async def _send_loop(
        self,
        sender: Any,
        srcs: list[int],
        only: dict[int, list[int]],
        attempt: int,
        start_rate: float,
        adaptive: bool,
    ) -> None:
        codec = self._codec
        assert codec is not None
        encode = codec.encode_block

        led = self.ledger
        session = self.session
        win_of = self._win_of_np
        windows = self._windows
        rate = start_rate
        window = windows[0]
        win_target = self.pacer.window_size()
        clock = trio.current_time
        next_t = clock()
        i = 0
        n = len(srcs)
        dsts = list(self.plan.dst_ports)
        per_src = max(1, len(dsts))
        # Several copies of a batch exist at once (payloads, packets): bound them in bytes.
        max_groups = max(1, min(MAX_BATCH_GROUPS, BATCH_BYTES // ((self.plan.size + 48) * per_src)))
        while i < n:
            if session.lost.is_set():
                raise AgentUnavailableError(f"agent {session.name!r} was lost during the run")
            if adaptive:
                rate = self.pacer.rate
            if self.rate_cap is not None:
                rate = min(rate, self.rate_cap())
            now = clock()
            if next_t > now:
                await trio.sleep_until(next_t)
                now = clock()
            else:
                next_t = max(next_t, now - 0.01)  # never burst to catch up after a stall
                await trio.lowlevel.checkpoint()
            want = max(1, min(max_groups, int(rate * BATCH_SECONDS / per_src)))
            if sender.free_slots() < want:
                self._apply_icmp(sender.reap(now))
                if sender.free_slots() <= 0:
                    await trio.sleep(max(0.001, sender.linger - sender.oldest_age(now)))
                    continue
                want = min(want, sender.free_slots())
            batch = srcs[i : i + want]
            i += len(batch)
            # Destination-major: one encode_block and one packet build per destination port.
            if only:
                owed: dict[int, list[int]] = {}
                for src in batch:
                    for d in only.get(src, dsts):
                        owed.setdefault(d, []).append(src)
                cells = {d: (ss, encode(d, ss, attempt)) for d, ss in owed.items()}
            else:
                cells = {d: (batch, encode(d, batch, attempt)) for d in dsts}
            results = sender.send_cells(cells, now)
            if results is None:  # everything went out
                sent_n = 0
                for d, (ss, _) in cells.items():
                    led.note_sent_many(d, ss)
                    sent_n += len(ss)
            else:
                sent_n = self._note_partial(results, only, dsts, srcs)
                next_t += 0.001 * (len(srcs) - n)  # the kernel's buffer was full: ease off
                n = len(srcs)
            win_of[np.asarray(batch, dtype=np.intp)] = len(windows) - 1
            window.sent += sent_n
            next_t += sent_n / rate if rate > 0 else 0
            if window.sent >= win_target:
                window.end = clock()
                window = _Window(rate)
                windows.append(window)
                win_target = self.pacer.window_size()
            self._apply_icmp(sender.reap(clock()))
            await self._report()

    def _note_partial(
        self,
        results: list[tuple[int, Any]],
        only: dict[int, list[int]],
        dsts: list[int],
        srcs: list[int],
    ) -> int:
        """Book a batch that did not all go out; requeue what backpressure held back.

        Returns:
            how many datagrams went out.
        """
        led = self.ledger
        sent_n = 0
        for src, res in results:
            for d in res.sent:
                led.note_sent(d, src)
            sent_n += len(res.sent)
            if not (res.untested or res.backpressure):
                continue  # anything not sent stays pending and goes again next round
            left = [d for d in only.get(src, dsts) if d not in res.sent]
            if res.untested:
                led.note_untested(src, res.untested, left)
            elif self._requeues.get(src, 0) < MAX_REQUEUES:
                # The kernel's buffer was full: the rest again at the end of the round.
                self._requeues[src] = self._requeues.get(src, 0) + 1
                only[src] = left
                srcs.append(src)
            else:  # never "blocked" for want of sending: say what happened
                led.note_untested(src, "the probe host's send buffer stayed full", left)
        return sent_n

    async def _settle(self, sender: Any) -> None:
        """Let the path drain, collect ICMP errors, and have the agent flush its receipts."""
        await trio.sleep(max(0.01, 2 * self.rtt))
        self._apply_icmp(sender.reap(trio.current_time(), everything=True))
        await self._flush()

    def _apply_icmp(self, events: list[IcmpEvent]) -> None:
        for ev in events:
            self.facts.icmp_errors += 1
            self.ledger.note_icmp(ev.dst_port, ev.src_port, IcmpInfo(ev.type, ev.code, ev.sender))

    def document(self, complete: bool) -> dict[str, Any]:
        led = self.ledger
        facts = self.facts
        est = facts.loss
        loss: dict[str, Any] | None = None
        if est is not None:
            unseen = led.unresolved_count() if not led.closed else led.summary()["blocked"]
            bound = est.false_blocked_bound(facts.max_attempt, unseen)
            loss = {
                "estimate": round(est.estimate, 5),
                "upper": round(est.upper, 5),
                "attempts": facts.max_attempt,
                "false_blocked_bound": bound,
                "confidence_target": self.plan.confidence,
                "confidence_reached": bound <= self.plan.confidence,
                "rate_found": round(self.pacer.rate),
                "rate_backoffs": self.pacer.backoffs,
            }
        finished = time.time()
        extra: dict[str, Any] = {
            "started": self.started,
            "finished": finished,
            "duration": round(finished - self.started, 3),
            "loss": loss,
            "probe_stats": {
                "sent": led.sent_total,
                "rounds": facts.rounds,
                "icmp_errors": facts.icmp_errors,
                "stale_receipts": facts.stale_receipts,
            },
            "agent_stats": facts.agent_stats,
            "observed_sources": led.observed_addresses(),
            "warnings": facts.warnings,
        }
        return build_document(
            run_id=self.run_id,
            complete=complete,
            agent=self._agent_json(),
            probe=self._probe_json(self.send_mode),
            plan=self.plan.to_json(),
            ledger=led,
            extra=extra,
        )
