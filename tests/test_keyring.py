"""Identities: the keyring, key files, the handshake with key ids, and the real probe with
per-agent and operator keys (names that cannot be stolen, keys that can be revoked live)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli, udpreach_argv
from hypothesis import given, settings
from hypothesis import strategies as st
from prockit import start, stop, wait_for, wait_log

from udpreach import keyring as kr
from udpreach.core.errors import AuthError, ConfigError
from udpreach.core.framing import (
    Authenticated,
    ControlConnection,
    Grant,
    KeyIdentity,
    KeyRoleError,
    client_key,
    parse_key_text,
)
from udpreach.secret import load_secret

# --- the keyring file ---------------------------------------------------------------------


def test_add_list_revoke_and_generations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default place: its folders are made (0700); a --keyring given makes none.
    monkeypatch.delenv(kr.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    path = tmp_path / "conf" / "udpreach" / "keyring.json"
    assert kr.default_path() == path
    with kr.edit(None, create=True) as ring:
        first = ring.add("pc-17", "agent")
        ring.add("ci", "operator")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ring = kr.Keyring.load(path)
    assert ring.identity("pc-17") == first
    assert ring.grant("ci") == Grant("operator", ring.key_for("ci") or b"")
    assert first.key not in path.read_bytes()  # only the master key is stored
    assert first.key.hex().encode() not in path.read_bytes()
    with kr.edit(path) as ring, pytest.raises(ConfigError, match="already has a key"):
        ring.add("pc-17", "agent")
    with kr.edit(path) as ring:
        ring.revoke("pc-17")
    assert kr.Keyring.load(path).key_for("pc-17") is None
    with kr.edit(path) as ring:
        second = ring.add("pc-17", "agent")
    assert second.key != first.key  # the old key file stays useless
    with kr.edit(path) as ring, pytest.raises(ConfigError, match="no key named"):
        ring.revoke("nobody")


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("{}", 0o600, "malformed"),
        ("not json", 0o600, "not JSON"),
        ('{"schema": "udpreach/keyring-v1", "master": "00"}', 0o600, "malformed"),
        (None, 0o640, "accessible by group or others"),
    ],
)
def test_an_unusable_keyring_is_a_config_error(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    path = tmp_path / "keyring.json"
    if content is None:
        with kr.edit(path, create=True) as ring:
            ring.add("a", "agent")
    else:
        path.write_text(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=message):
        kr.Keyring.load(path)


def test_key_files_name_their_owner() -> None:
    ident = KeyIdentity("agent", "pc-17", bytes(range(32)))
    assert parse_key_text(ident.text()) == ident
    assert parse_key_text(ident.text() + b"\n") == ident
    assert client_key(ident.text()) == ident.key
    assert parse_key_text(b"0123456789abcdef0123456789abcdef") is None  # a shared secret
    for bad in (b"udpreach-key-v1 agent pc-17", b"udpreach-key-v1 root pc-17 " + b"00" * 32,
                b"udpreach-key-v1 agent ../x " + b"00" * 32,
                b"udpreach-key-v1 agent a " + b"00" * 31):  # fmt: skip
        with pytest.raises(ConfigError, match="malformed udpreach key file"):
            parse_key_text(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_key_text_raises_only_config_errors(raw: bytes) -> None:
    for text in (raw, b"udpreach-key-v1 " + raw):
        try:
            ident = parse_key_text(text)
        except ConfigError:
            continue
        assert ident is None or len(ident.key) == 32


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_keyring_file_raises_only_config_errors(raw: bytes) -> None:
    with contextlib.suppress(ConfigError):
        kr.Keyring._parse(Path("k"), raw)


# --- the handshake with key ids (sans-IO) ------------------------------------------------


def _handshake(client: ControlConnection, server: ControlConnection) -> list[object]:
    client.initiate()
    events: list[object] = []
    for _ in range(4):
        data = client.data_to_send()
        if data:
            events += server.receive_data(data)
        back = server.data_to_send()
        if back:
            events += client.receive_data(back)
    return events


def _lookup(ring: dict[str, Grant]):  # type: ignore[no-untyped-def]
    return ring.get


KEYS = {"pc-17": Grant("agent", b"k" * 32), "ci": Grant("operator", b"o" * 32)}


def test_an_agent_proves_its_own_key() -> None:
    client = ControlConnection(
        "client", KeyIdentity("agent", "pc-17", b"k" * 32).text(), purpose="agent"
    )
    server = ControlConnection("server", b"shared-secret-0123456789", keys=_lookup(KEYS))
    events = _handshake(client, server)
    assert Authenticated("agent", "agent", "pc-17") in events
    assert server.is_open
    assert client.is_open


@pytest.mark.parametrize(
    ("identity", "purpose", "error", "message"),
    [
        (KeyIdentity("agent", "pc-17", b"x" * 32), "agent", AuthError, "does not know key"),
        (KeyIdentity("agent", "nobody", b"k" * 32), "agent", AuthError, "does not know key"),
        (KeyIdentity("agent", "pc-17", b"k" * 32), "control", KeyRoleError, "cannot start runs"),
        (KeyIdentity("operator", "ci", b"o" * 32), "agent", KeyRoleError, "operator's key"),
    ],
)
def test_wrong_or_misused_keys_are_refused(
    identity: KeyIdentity, purpose: str, error: type[Exception], message: str
) -> None:
    client = ControlConnection("client", identity.text(), purpose=purpose)
    server = ControlConnection("server", None, keys=_lookup(KEYS))

    def exchange() -> None:
        client.initiate()
        for _ in range(4):
            assert not server.receive_data(client.data_to_send())
            client.receive_data(server.data_to_send())

    with pytest.raises(error) as raised:
        exchange()
    assert message in str(raised.value)


def test_no_shared_secret_means_keys_only() -> None:
    client = ControlConnection("client", b"shared-secret-0123456789", purpose="control")
    server = ControlConnection("server", None, keys=_lookup(KEYS))
    with pytest.raises(AuthError, match="does not know our secret"):
        _handshake(client, server)


# --- the real probe with a keyring -------------------------------------------------------


class Keyed:
    """A probe with a keyring, and the key files it issued."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ring = tmp / "keyring.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoint = ""

    def key(self, name: str, *extra: str) -> Path:
        out = self.tmp / f"{name}.key"
        got = run_cli("key", "add", name, "--keyring", str(self.ring), "--out", str(out), *extra)
        assert got.returncode == 0, got.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        return out

    def probe(self) -> None:
        ready = self.tmp / "ready.json"
        self.procs.append(
            start(["probe", "--control", "127.0.0.1:0", "--keyring", str(self.ring),
                   "--db", str(self.tmp / "runs.sqlite3"), "--source", "127.0.0.2",
                   "--ready-file", str(ready)], self.tmp / "probe.log")
        )  # fmt: skip
        addr = wait_for(lambda: ready.exists() and ready.stat().st_size and
                        json.loads(ready.read_text()), "the probe", 20)  # fmt: skip
        self.endpoint = f"127.0.0.1:{addr['port']}"

    def agent(self, key: Path, log: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = start(["agent", "--coordinator", self.endpoint, "--secret-file", str(key),
                      "--port", "0", "--listen", "127.0.0.1", *extra], self.tmp / log)  # fmt: skip
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, key: Path) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--coordinator", self.endpoint, "--secret-file", str(key))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            stop(p)


@pytest.fixture
def keyed(tmp_path: Path):  # type: ignore[no-untyped-def]
    k = Keyed(tmp_path)
    yield k
    k.close()


def test_agents_prove_their_names_and_operators_make_requests(keyed: Keyed) -> None:
    pc17, other, ci = keyed.key("pc-17"), keyed.key("pc-18"), keyed.key("ci", "--operator")
    listed = run_cli("key", "list", "--keyring", str(keyed.ring), "--json")
    assert [(k["name"], k["role"]) for k in json.loads(listed.stdout)["keys"]] == [
        ("pc-17", "agent"), ("pc-18", "agent"), ("ci", "operator")
    ]  # fmt: skip
    keyed.probe()
    keyed.agent(pc17, "pc17.log")  # no --name: the key file names it
    wait_log(keyed.tmp / "pc17.log", "registered as 'pc-17'", timeout=20)

    got = keyed.cli("run", "--agent", "pc-17", "--src-ports", "1024-2047", "--json", key=ci)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["summary"]["open"] == 1024

    # An agent key cannot start runs or list agents.
    for args in (("run", "--agent", "pc-17", "--json"), ("agents", "--json")):
        refused = keyed.cli(*args, key=pc17)
        assert refused.returncode == 3, refused.stderr
        assert (
            "agent's key: agent keys cannot start runs" in refused.stderr.strip().splitlines()[-1]
        )
    # An operator key cannot register an agent; another agent's key cannot claim the name.
    op = subprocess.run(
        udpreach_argv("agent", "--coordinator", keyed.endpoint, "--secret-file", str(ci),
                      "--port", "0", "--listen", "127.0.0.1"),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert op.returncode == 2, op.stderr
    assert "operator key" in op.stderr
    thief = subprocess.run(
        udpreach_argv("agent", "--coordinator", keyed.endpoint, "--secret-file", str(other),
                      "--port", "0", "--listen", "127.0.0.1", "--name", "pc-17"),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert thief.returncode == 2, thief.stderr
    assert "does not match the key file" in thief.stderr
    assert "Traceback" not in op.stderr + thief.stderr
    agents = keyed.cli("agents", "--json", key=ci)
    assert [a["name"] for a in json.loads(agents.stdout)["agents"]] == ["pc-17"]
    # A second agent with the same key file: another --name cannot help (the key names
    # it), a key of its own does.
    keyed.agent(pc17, "dup.log")
    wait_log(keyed.tmp / "dup.log", "its key is for one agent: give this one a key of its own",
             timeout=20)  # fmt: skip


def test_a_malformed_key_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "pc-17.key"
    bad.write_bytes(b"udpreach-key-v1 agent pc-17 zz\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match=f"^{bad}: malformed udpreach key file$"):
        load_secret(bad)


def test_a_silent_agents_name_goes_to_its_key_and_revocation_is_live(keyed: Keyed) -> None:
    pc17, ci = keyed.key("pc-17"), keyed.key("ci", "--operator")
    keyed.probe()
    old = keyed.agent(pc17, "old.log")
    wait_log(keyed.tmp / "old.log", "registered as 'pc-17'", timeout=20)
    # The old agent hangs (stopped, its connection open): its own key takes the name over
    # once the old session fails to answer.
    os.kill(old.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    new = keyed.agent(pc17, "new.log")
    wait_log(keyed.tmp / "new.log", "registered as 'pc-17'", timeout=20)
    assert 2.5 <= time.monotonic() - t0 < 15
    assert "stopped answering; the one from" in (keyed.tmp / "probe.log").read_text()
    stop(old, signal.SIGKILL)

    # Revoked while connected: the probe drops it within seconds, and it cannot come back.
    got = run_cli("key", "revoke", "pc-17", "--keyring", str(keyed.ring))
    assert got.returncode == 0, got.stderr
    new.wait(timeout=20)
    assert new.returncode == 3
    assert "does not know key 'pc-17'" in (keyed.tmp / "new.log").read_text()
    agents = keyed.cli("agents", "--json", key=ci)
    assert json.loads(agents.stdout)["agents"] == []
    # An operator revoked: refused from then on.
    assert run_cli("key", "revoke", "ci", "--keyring", str(keyed.ring)).returncode == 0
    time.sleep(0.2)
    refused = keyed.cli("agents", "--json", key=ci)
    assert refused.returncode == 3
    assert "does not know key 'ci'" in refused.stderr


def test_the_shared_secret_cannot_claim_a_keyed_name(keyed: Keyed, secret_file: Path) -> None:
    keyed.key("pc-17")
    ring = kr.Keyring.load(keyed.ring)
    assert ring.entries
    keyed.probe()
    # The probe was started with its keyring only: a shared secret is not accepted at all.
    refused = subprocess.run(
        udpreach_argv("agent", "--coordinator", keyed.endpoint, "--secret-file",
                      str(secret_file), "--port", "0", "--listen", "127.0.0.1", "--name", "pc-17"),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode == 3
    assert "does not know our secret" in refused.stderr


def test_key_commands_fail_in_one_line(tmp_path: Path) -> None:
    ring = str(tmp_path / "keyring.json")

    def add(name: str, out: str) -> tuple[str, ...]:
        return ("key", "add", name, "--keyring", ring, "--out", str(tmp_path / out))

    assert run_cli(*add("a", "a.key")).returncode == 0
    for args, code, text in [
        (add("a", "b.key"), 2, "already has a key"),
        (add("b", "a.key"), 2, "already exists"),
        (add("../x", "x.key"), 2, "key name"),
        (("key", "revoke", "zz", "--keyring", ring), 2, "no key named"),
        (("key", "list", "--keyring", str(tmp_path / "none.json")), 2, "no keyring"),
        # An agent's key file as the coordinator's shared secret: nobody could log in.
        (
            ("probe", "--control", "127.0.0.1:0", "--secret-file", str(tmp_path / "a.key")),
            2,
            "is a key file (udpreach key add), not a shared secret",
        ),
        # A typo in the folder is an error, not a new folder (as ``probe --db``).
        (
            ("key", "add", "c", "--keyring", str(tmp_path / "typo" / "k.json")),
            2,
            f"no directory {tmp_path / 'typo'}",
        ),
    ]:
        got = run_cli(*args)
        assert got.returncode == code, (args, got.stderr)
        (line,) = got.stderr.strip().splitlines()
        assert text in line, line
    assert not (tmp_path / "b.key").exists()
    assert not (tmp_path / "typo").exists()
