"""Attacks on a coordinator or an agent, run as a process of their own by the trust tests.

``python tests/attack.py MODE JSON``: every mode is bounded in time (``seconds``) and in
count (``max_attempts``, ``n``), talks only to the loopback addresses it is given, prints
``ready`` once its attack is in place (where that means something) and one JSON line of
results at the end.

- ``hold``: keep ``n`` unauthenticated TCP connections open to the coordinator from the
  ``sources`` (loopback addresses), each sending ``prefix`` (nothing, or a hello) and then
  nothing; a connection the coordinator drops is opened again at once.
- ``impostor``: authenticate with the shared secret and register the name ``name`` from
  ``source``, again and again; counts how often the coordinator took the registration.
- ``fake_agents``: ``n`` authenticated agents (``fake-0``...) that answer pings.
- ``unsolicited``: one authenticated agent that registers and then sends ``n`` messages
  nobody asked for; reports whether the coordinator cut it off.
- ``coordinator``: a hostile coordinator on ``port``: it greets one agent and sends it the
  ``messages`` (raw JSON texts, MACed as genuine frames), then pings it, and reports what the
  agent answered and whether it answered the ping.
- ``result``: a coordinator on ``port`` that answers one run request with ``doc`` (a raw
  JSON text) as the result.
- ``liar``: an authenticated agent ``name`` with nothing listening that, as soon as a run
  starts, reports every cell of ``src_first``..``src_last`` to its destination ports as
  received (attempt 1), and answers flushes and pings: receipts for what was never sent.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
from typing import Any

import trio

from udpreach.core import framing
from udpreach.core.framing import PROTO, ControlConnection, Message
from udpreach.net.channel import Channel, connect

# Also runs against an older udpreach (to show what an attack did before a fix).
Malformed: Any = getattr(framing, "Malformed", type(None))


def _hello(purpose: str) -> bytes:
    body = (
        b"J"
        + json.dumps(
            {"type": "hello", "proto": PROTO, "purpose": purpose, "nonce": os.urandom(16).hex()}
        ).encode()
    )
    return len(body).to_bytes(4, "big") + body


async def hold(cfg: dict[str, Any]) -> dict[str, Any]:
    host, port, n = cfg["host"], cfg["port"], cfg["n"]
    sources = cfg["sources"]
    prefix = _hello("control") if cfg.get("prefix") == "hello" else b""
    attempts = dropped = failed = 0
    open_now = 0
    peak = 0
    limit = cfg.get("max_attempts", 200_000)

    async def one(slot: int) -> None:
        nonlocal attempts, dropped, failed, open_now, peak
        src = sources[slot % len(sources)]
        while attempts < limit:
            attempts += 1
            try:
                stream = await trio.open_tcp_stream(host, port, local_address=src)
            except OSError:
                failed += 1
                await trio.sleep(0.01)
                continue
            open_now += 1
            peak = max(peak, open_now)
            try:
                if prefix:
                    await stream.send_all(prefix)
                while await stream.receive_some(4096):
                    pass  # a refusal or a challenge: never answered
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                open_now -= 1
                await stream.aclose()
            dropped += 1

    ready = False
    with trio.move_on_after(cfg["seconds"]):
        async with trio.open_nursery() as nursery:
            for slot in range(n):
                nursery.start_soon(one, slot)
                if slot % 50 == 49:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            print("ready", flush=True)
            ready = True
            await _until_stdin_closes()
            nursery.cancel_scope.cancel()
    return {"attempts": attempts, "dropped": dropped, "failed": failed, "peak": peak,
            "ready": ready}  # fmt: skip


async def _until_stdin_closes() -> None:
    """Return when the test closes our stdin (or never, if it does not)."""
    await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)


async def _dial(cfg: dict[str, Any], purpose: str, source: str | None) -> Channel:
    """Authenticate with the shared secret from *source* (a loopback address)."""
    if source is None:
        return await connect(cfg["host"], cfg["port"], cfg["secret"].encode(), purpose, 5)
    stream = await trio.open_tcp_stream(cfg["host"], cfg["port"], local_address=source)
    chan = Channel(stream, ControlConnection("client", cfg["secret"].encode(), purpose=purpose))
    try:
        with trio.fail_after(5):
            await chan.client_handshake()
    except BaseException:
        await chan.aclose()
        raise
    return chan


async def _agent(cfg: dict[str, Any], name: str, source: str | None = None) -> Channel:
    chan = await _dial(cfg, "agent", source)
    await chan.send(
        {"type": "register", "name": name, "address": source or "127.0.0.1",
         "ports": [cfg.get("agent_port", 9)], "rcvbuf": 0}
    )  # fmt: skip
    return chan


async def impostor(cfg: dict[str, Any]) -> dict[str, Any]:
    took = refused = errors = 0
    replies: list[str] = []
    with trio.move_on_after(cfg["seconds"]):
        for _ in range(cfg.get("max_attempts", 1000)):
            try:
                chan = await _agent(cfg, cfg["name"], cfg.get("source"))
                try:
                    with trio.fail_after(10):
                        reply = (await chan.next_message()).body
                finally:
                    await chan.aclose()
            except Exception as exc:  # counted, and the attack goes on
                errors += 1
                replies.append(f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.2)
                continue
            if reply.get("type") == "registered":
                took += 1
            else:
                refused += 1
            if len(replies) < 5:
                replies.append(json.dumps(reply))
            await trio.sleep(cfg.get("every", 0.2))
    return {"took": took, "refused": refused, "errors": errors, "replies": replies}


async def fake_agents(cfg: dict[str, Any]) -> dict[str, Any]:
    registered = 0

    async def serve(i: int, task_status: trio.TaskStatus[None]) -> None:
        nonlocal registered
        sources = cfg.get("sources") or [None]
        chan = await _agent(cfg, f"fake-{i}", sources[i % len(sources)])
        try:
            reply = await chan.next_message()
            if reply.type == "registered":
                registered += 1
            task_status.started()
            while True:
                msg = await chan.next_message()
                if msg.type == "ping":
                    await chan.send({"type": "pong", "seq": msg.body["seq"]})
        finally:
            await chan.aclose()

    with trio.move_on_after(cfg["seconds"]):
        async with trio.open_nursery() as nursery:
            for i in range(cfg["n"]):
                with trio.fail_after(10):
                    await nursery.start(serve, i)
            print(json.dumps({"registered": registered}), flush=True)
            await trio.sleep_forever()
    return {"registered": registered}


async def unsolicited(cfg: dict[str, Any]) -> dict[str, Any]:
    chan = await _agent(cfg, cfg["name"])
    sent = 0
    cut = False
    try:
        reply = await chan.next_message()
        assert reply.type == "registered", reply
        kinds = [{"type": "pong", "seq": 1}, {"type": "run_ready", "run_id": "x", "nonce": "00"},
                 {"type": "flushed", "seq": 7}, {"type": "nonsense"}]  # fmt: skip
        with trio.move_on_after(cfg["seconds"]):
            for i in range(cfg["n"]):
                try:
                    await chan.send(kinds[i % len(kinds)])
                except Exception:
                    cut = True
                    break
                sent += 1
                if i % 100 == 0:
                    await trio.lowlevel.checkpoint()
            with trio.move_on_after(5):
                while True:
                    await chan.next_event()
    except Exception:
        cut = True
    finally:
        await chan.aclose()
    return {"sent": sent, "cut": cut}


async def coordinator(cfg: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"answers": [], "pong": False}
    done = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        chan = Channel(stream, ControlConnection("server", cfg["secret"].encode()))
        try:
            with trio.fail_after(10):
                await chan.server_handshake()
                reg = await chan.next_message()
            result["registered"] = reg.body.get("name")
            await chan.send({"type": "registered", "observed": "127.0.0.1"})
            for raw in cfg["messages"]:
                chan.conn._send_frame(b"J", raw.encode())  # as a buggy or hostile peer would
                await chan._flush()
                with trio.fail_after(5):
                    ev = await chan.next_event()
                if isinstance(ev, Message):
                    result["answers"].append(ev.body)
                elif isinstance(ev, Malformed):
                    result["answers"].append({"malformed": ev.reason})
                else:
                    result["answers"].append({"event": type(ev).__name__})
            await chan.send({"type": "ping", "seq": 42})
            with trio.fail_after(5):
                ev = await chan.next_event()
            result["pong"] = isinstance(ev, Message) and ev.body == {"type": "pong", "seq": 42}
        finally:
            await chan.aclose()
            done.set()

    with trio.move_on_after(cfg["seconds"]):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(trio.serve_tcp, host="127.0.0.1"), handle, cfg["port"]
            )
            print("ready", flush=True)
            await done.wait()
            nursery.cancel_scope.cancel()
    return result


async def result(cfg: dict[str, Any]) -> dict[str, Any]:
    served = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        chan = Channel(stream, ControlConnection("server", cfg["secret"].encode()))
        try:
            with trio.fail_after(10):
                await chan.server_handshake()
                await chan.next_message()
            await chan.send({"type": "result_part", "data": cfg["doc"]})
            await chan.send({"type": "result_end", "complete": True})
            with trio.move_on_after(2):
                await chan.next_event()
        except Exception:  # whatever the client did, the test judges its exit
            pass
        finally:
            await chan.aclose()
            served.set()

    with trio.move_on_after(cfg["seconds"]):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(trio.serve_tcp, host="127.0.0.1"), handle, cfg["port"]
            )
            print("ready", flush=True)
            await served.wait()
            nursery.cancel_scope.cancel()
    return {"served": served.is_set()}


async def liar(cfg: dict[str, Any]) -> dict[str, Any]:
    from udpreach.core.framing import RECEIPT, encode_receipts

    chan = await _agent(cfg, cfg["name"])
    reported = runs = 0
    print("ready", flush=True)
    with trio.move_on_after(cfg["seconds"]):
        while True:
            msg = await chan.next_message()
            body = msg.body
            if msg.type == "run_start":
                runs += 1
                run_id = body["run_id"]
                await chan.send(
                    {"type": "run_ready", "run_id": run_id, "nonce": os.urandom(16).hex()}
                )
                cells = [
                    (0, d, s, 1, s)
                    for d in body["dst_ports"]
                    for s in range(cfg["src_first"], cfg["src_last"] + 1)
                ]
                for i in range(0, len(cells), 8192):
                    records = b"".join(RECEIPT.pack(*c) for c in cells[i : i + 8192])
                    await chan.send_receipts(encode_receipts(run_id, ["127.0.0.2"], records))
                reported += len(cells)
            elif msg.type == "flush":
                await chan.send({"type": "flushed", "seq": body["seq"]})
            elif msg.type == "run_end":
                await chan.send({"type": "run_done", "run_id": body["run_id"]})
                break  # one run is the attack
            elif msg.type == "ping":
                await chan.send({"type": "pong", "seq": body["seq"]})
    await chan.aclose()
    return {"runs": runs, "reported": reported}


MODES = {
    f.__name__: f for f in (hold, impostor, fake_agents, unsolicited, coordinator, result, liar)
}


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    for key in ("host", "sources", "source"):  # the network safety rule, enforced here too
        values = cfg.get(key)
        for v in values if isinstance(values, list) else [values] if values else []:
            assert v.startswith("127."), f"attack.py talks to loopback only, not {v}"
    random.seed(cfg.get("seed", 1))
    out = trio.run(MODES[mode], cfg)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
