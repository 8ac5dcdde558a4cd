"""Fixtures for the official-SDK protocol suite.

The session fixture starts the real binary, `${TETHER_BIN:-<repo>/target/debug/tether} dev
--listen 127.0.0.1:0`, reads the address it prints, waits for `/readyz`, and stops it at the
end (SIGTERM, then SIGKILL after a bound). Every wait has a deadline; nothing sleeps to wait.
Set `TETHER_URL=http://127.0.0.1:PORT` to run the suite against a server that is already up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from openai import OpenAI

from helpers import WsConn

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / "target" / "debug" / "tether"
LISTEN_LINE = re.compile(r"tether listening on (http://127\.0\.0\.1:\d+)")

STARTUP_TIMEOUT_S = 60.0  # until the "listening" line
READY_TIMEOUT_S = 30.0  # until GET /readyz answers 200
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL
LOG_TAIL_CHARS = 20_000  # how much server log to print on failure


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes] | None = None
    stdout_lines: list[str] = field(default_factory=list)
    stderr_path: Path | None = None
    exit_code: int | None = None

    def log_text(self) -> str:
        parts = []
        if self.stdout_lines:
            parts.append("--- tether stdout ---\n" + "".join(self.stdout_lines))
        if self.stderr_path is not None and self.stderr_path.exists():
            parts.append("--- tether stderr ---\n" + self.stderr_path.read_text(errors="replace"))
        text = "\n".join(parts)
        if len(text) > LOG_TAIL_CHARS:
            text = f"[... {len(text) - LOG_TAIL_CHARS} chars cut ...]\n" + text[-LOG_TAIL_CHARS:]
        return text


_SERVER: Server | None = None


def _pump_stdout(proc: subprocess.Popen[bytes], lines: list[str], found: threading.Event, box: list[str]) -> None:
    """Read the server's stdout to its end: find the listening line, keep the rest for the log."""
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        lines.append(line)
        if not found.is_set():
            match = LISTEN_LINE.search(line)
            if match:
                box.append(match.group(1))
                found.set()
    found.set()  # EOF: wake the waiter; it sees that no address was found


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            pytest.fail(f"tether exited with {server.proc.returncode} before /readyz\n{server.log_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
                last = f"status {reply.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)  # poll interval; the deadline bounds the wait
    pytest.fail(f"GET /readyz did not answer 200 within {READY_TIMEOUT_S}s (last: {last})\n{server.log_text()}")


def start_dev(*extra: str) -> Server:
    """Starts `tether dev --listen 127.0.0.1:0 EXTRA...` and waits until it is ready."""
    binary = Path(os.environ.get("TETHER_BIN") or DEFAULT_BIN)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(f"tether binary not found or not executable: {binary} (build it, or set TETHER_BIN)")
    stderr_file = tempfile.NamedTemporaryFile(prefix="tether-", suffix=".stderr.log", delete=False)
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "1")
    env.setdefault("NO_COLOR", "1")
    proc = subprocess.Popen(
        [str(binary), "dev", "--listen", "127.0.0.1:0", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        env=env,
        cwd=REPO,
    )
    stderr_file.close()
    server = Server(url="", proc=proc, stderr_path=Path(stderr_file.name))
    found = threading.Event()
    box: list[str] = []
    threading.Thread(
        target=_pump_stdout, args=(proc, server.stdout_lines, found, box), name="tether-stdout", daemon=True
    ).start()
    if not found.wait(STARTUP_TIMEOUT_S) or not box:
        code = proc.poll()
        _stop(server)
        state = f"exited with {code}" if code is not None else f"printed no address within {STARTUP_TIMEOUT_S}s"
        pytest.fail(f"tether {state}; expected a line 'tether listening on http://127.0.0.1:PORT'\n{server.log_text()}")
    server.url = box[0]
    _wait_ready(server)
    return server


def _stop(server: Server) -> None:
    proc = server.proc
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
            server.stdout_lines.append(f"[conftest] tether ignored SIGTERM for {STOP_TIMEOUT_S}s: killed\n")
    server.exit_code = proc.returncode


@pytest.fixture(scope="session")
def tether() -> Iterator[Server]:
    global _SERVER
    external = os.environ.get("TETHER_URL")
    if external:
        server = Server(url=external.rstrip("/"))
        _wait_ready(server)
        _SERVER = server
        yield server
        return
    server = start_dev()
    _SERVER = server
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture(autouse=True)
def _server_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test clearly if the server died before or during it."""
    if "tether" not in request.fixturenames:
        yield
        return
    server: Server = request.getfixturevalue("tether")
    if server.proc is not None and server.proc.poll() is not None:
        pytest.fail(f"tether is not running (exit code {server.proc.returncode})")
    yield
    if server.proc is not None and server.proc.poll() is not None:
        pytest.fail(f"tether exited during this test (exit code {server.proc.returncode})")


@pytest.fixture(scope="session")
def base_url(tether: Server) -> str:
    return tether.url


@pytest.fixture(scope="session")
def client(base_url: str) -> Iterator[OpenAI]:
    # max_retries=0: a retried 5xx would hide a server bug from the assertions.
    with OpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0, timeout=30.0) as c:
        yield c


@pytest.fixture
def ws(client: OpenAI) -> Iterator[WsConn]:
    """A fresh `client.responses.connect()` connection per test."""
    with client.responses.connect() as connection:
        yield WsConn(connection)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    server = _SERVER
    if server is None:
        return
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if server.exit_code not in (None, 0):
        terminalreporter.write_line(f"tether exited with code {server.exit_code} after SIGTERM", red=True)
    if failed and server.proc is not None:
        terminalreporter.section("tether server log")
        terminalreporter.write_line(server.log_text())
