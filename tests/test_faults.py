"""The fault suite: a failing machine and a misbehaving teacher, attacked on purpose (issue 19).

Each test says what was lost (nothing) and what the user saw (one line). The attacks:
- distillation against `FaultyTeacher`, an OpenAI-compatible endpoint on 127.0.0.1 that answers
  with HTTP 500s, truncated bodies, garbage status lines, resets, hangs and byte-by-byte trickles,
  then stops by itself (bounded in time and in requests); the distill process killed (SIGKILL) or
  interrupted (SIGINT) mid-run, an endpoint that rejects a request, a grader that raises;
- checkpoints truncated, bit-flipped and missing a file; a disk that fills up (a real tmpfs
  where the machine allows mounting one (640 KiB), and always a file-size limit that makes writes fail);
- GRPO on the demo-sized model of tests/test_grpo_loop.py killed during a step and during a
  checkpoint write, with a bit-flipped checkpoint in between, then resumed: equal to a run that was
  never interrupted (slow: four training processes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmath import distill
from jaxmath.checkpoint import CheckpointManager, DamagedCheckpointError
from jaxmath.data.prompts import INSTRUCTION
from tests.test_checkpoint import _train_state, assert_trees_bit_equal
from tests.test_distill import TABLE

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = list(TABLE)  # six problems; four of the teacher's replies are correct


def _child_env() -> dict[str, str]:
    return {**os.environ, "JAXMATH_NO_PROGRESS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


# -- the faulty teacher -----------------------------------------------------------------------------


class FaultyTeacher:
    """A chat-completions endpoint on 127.0.0.1 that misbehaves as planned, then stops by itself.

    plan: {problem: [behaviour of the 1st try, of the 2nd, ...]}; later tries get "ok". Behaviours:
      ok          the right JSON reply
      500, 404    that HTTP status
      late_404    404 after 0.5 s
      truncated   Content-Length 50 bytes more than the body, half the body, then close
      bad_status  a status line that is not HTTP
      reset       close with a TCP reset before answering
      hang        say nothing until the teacher stops
      trickle     the right reply, one byte every 0.2 s (about 40 s in all)
    A client that opens TLS (an https:// endpoint) gets plain HTTP back, which its TLS layer refuses.
    It stops after `lifetime` seconds or `max_requests` requests, whichever comes first; hangs and
    trickles end with it.
    """

    def __init__(self, plan: dict[str, list[str]] | None = None, *, lifetime: float = 30.0, max_requests: int = 60):
        self.plan = {problem: list(steps) for problem, steps in (plan or {}).items()}
        self.log: list[dict] = []  # per request, as it arrives: problem, behaviour, seconds (when it ends)
        self.delivered: list[str] = []  # problems whose right reply was sent in full
        self.max_requests = max_requests
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + lifetime
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def requests(self) -> list[str]:
        """The problem of every request so far, in order of arrival."""
        with self._lock:
            return [entry["problem"] for entry in self.log]

    def behaviours(self, problem: str) -> list[str]:
        with self._lock:
            return [entry["behaviour"] for entry in self.log if entry["problem"] == problem]

    def _serve(self) -> None:
        accepted = 0
        while not self.stopped.is_set() and time.monotonic() < self._deadline:
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            accepted += 1
            if accepted > self.max_requests:
                connection.close()
                break
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()
        self.stopped.set()
        self._listener.close()

    def _handle(self, connection: socket.socket) -> None:
        start, entry = time.monotonic(), None
        try:
            connection.settimeout(10)
            if connection.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS ClientHello
                with self._lock:
                    entry = {"problem": "(TLS handshake)", "behaviour": "plain_http_to_tls", "seconds": None}
                    self.log.append(entry)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            problem = self._read_problem(connection)
            with self._lock:
                steps = self.plan.get(problem, [])
                entry = {"problem": problem, "behaviour": steps.pop(0) if steps else "ok", "seconds": None}
                self.log.append(entry)
            getattr(self, "_" + entry["behaviour"])(connection, problem)
        except (OSError, ValueError, AttributeError):
            pass  # the client cut the connection off (part of the attack) or sent half a request
        finally:
            if entry is not None:
                entry["seconds"] = time.monotonic() - start
            connection.close()

    @staticmethod
    def _read_problem(connection: socket.socket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionError("client went away")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE).group(1))
        while len(body) < length:
            body += connection.recv(65536)
        user = json.loads(body)["messages"][-1]["content"]
        return user[: -len(INSTRUCTION)].rstrip()

    @staticmethod
    def _response(status: str, body: bytes, length: int | None = None) -> bytes:
        length = len(body) if length is None else length
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
                "Connection: close\r\n\r\n").encode() + body

    @staticmethod
    def _reply(problem: str) -> bytes:
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": TABLE[problem][1]},
                                        "finish_reason": "stop"}]}).encode()

    def _ok(self, connection, problem):
        connection.sendall(self._response("200 OK", self._reply(problem)))
        with self._lock:
            self.delivered.append(problem)

    def _500(self, connection, problem):
        connection.sendall(self._response("500 Internal Server Error", b'{"error": "injected"}'))

    def _404(self, connection, problem):
        connection.sendall(self._response("404 Not Found", b'{"error": "model not found"}'))

    def _late_404(self, connection, problem):
        time.sleep(0.5)
        self._404(connection, problem)

    def _truncated(self, connection, problem):
        body = self._reply(problem)
        connection.sendall(self._response("200 OK", body, length=len(body) + 50)[: -len(body) // 2])

    def _bad_status(self, connection, problem):
        connection.sendall(b"SPAM SPAM SPAM\r\n\r\n")

    def _reset(self, connection, problem):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _hang(self, connection, problem):
        self.stopped.wait(max(0.0, self._deadline - time.monotonic()))

    def _trickle(self, connection, problem):
        for i, byte in enumerate(self._response("200 OK", self._reply(problem))):
            if self.stopped.wait(0.2 if i else 0):
                return
            connection.sendall(bytes([byte]))
        with self._lock:
            self.delivered.append(problem)

    def close(self) -> None:
        self.stopped.set()
        self._thread.join(5)

    def __enter__(self) -> FaultyTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def problem_file(tmp_path) -> str:
    path = tmp_path / "six.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": TABLE[p][0]}) + "\n"
                            for i, p in enumerate(PROBLEMS)))
    return str(path)


def _config(url: str, problem_file: str, **overrides) -> distill.DistillConfig:
    settings = dict(concurrency=6, max_retries=3, backoff_seconds=0.05, timeout=1.0, api_key_env="")
    return distill.DistillConfig(endpoint=url, sources=(problem_file,), **{**settings, **overrides})


def _journal(workdir: Path, kind: str) -> list[dict]:
    path = workdir / "traces.jsonl.attempts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r for r in rows if r.get("kind") == kind]


def _kept(workdir: Path) -> list[str]:
    return sorted(json.loads(line)["problem"] for line in (workdir / "traces.jsonl").read_text().splitlines())


CORRECT = sorted(p for p, (_, _, ok) in TABLE.items() if ok)


def _distill_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "distill" in r.getMessage()]


# -- distillation -----------------------------------------------------------------------------------


def test_every_transport_fault_is_retried_and_nothing_is_lost(tmp_path, problem_file, caplog):
    """500 twice, a truncated body, a garbage status line, a reset, a trickle and a hang, one per problem.
    Lost: nothing (six replies, four kept). Seen: one warning line per failed try, naming the fault.
    The trickle and the hang are cut off at distill.timeout (2 s here: at 1 s an ordinary reply on a
    machine at load 15 could miss it and be retried) of wall clock; before, a trickle held a request
    for as long as it kept sending."""
    plan = dict(zip(PROBLEMS, [["500", "500"], ["truncated"], ["bad_status"], ["reset"], ["trickle"], ["hang"]]))
    start = time.monotonic()
    with FaultyTeacher(plan) as teacher:
        summary = distill.run_distill(_config(teacher.url, problem_file, timeout=2.0), tmp_path)
        elapsed = time.monotonic() - start
        for problem, steps in plan.items():  # each fault once (the 500 twice), then the right answer
            assert teacher.behaviours(problem) == steps + ["ok"], problem
        trickle = next(entry for entry in teacher.log if entry["behaviour"] == "trickle")
        while trickle["seconds"] is None and time.monotonic() - start < 20:  # the teacher notices the cut
            time.sleep(0.05)
    assert trickle["seconds"] < 5.0  # cut off at 2 s, not after the ~40 s the trickle takes
    assert elapsed < 20, elapsed
    assert summary["graded"] == 6 and summary["kept"] == 4 and summary["failed_requests"] == 0
    assert _kept(tmp_path) == CORRECT
    warnings = _distill_warnings(caplog)
    assert all("\n" not in w for w in warnings) and len(warnings) == 7
    seen = " ".join(warnings)
    for fault in ("HTTP 500", "IncompleteRead", "BadStatusLine", "no complete reply within distill.timeout=2 s"):
        assert fault in seen, fault
    assert "Connection" in seen  # the reset: RemoteDisconnected or ConnectionResetError


def test_a_request_that_keeps_failing_is_recorded_and_asked_again(tmp_path, problem_file, caplog):
    """Truncated bodies past the retries. Lost: nothing: the failure is in the journal and the next run
    asks that problem (and only it). Seen: one line saying it will be asked again."""
    with FaultyTeacher({PROBLEMS[0]: ["truncated"] * 3}) as teacher:
        first = distill.run_distill(_config(teacher.url, problem_file, max_retries=2), tmp_path)
    assert first["failed_requests"] == 1 and first["unanswered"] == 1 and first["graded"] == 5
    failed = _journal(tmp_path, "failed")
    assert [r["id"] for r in failed] == ["six/p0"] and "IncompleteRead" in failed[0]["error"]
    assert any("six/p0 failed; the next run asks it again" in w for w in _distill_warnings(caplog))
    with FaultyTeacher() as teacher:
        second = distill.run_distill(_config(teacher.url, problem_file), tmp_path)
        assert teacher.requests() == [PROBLEMS[0]]
    assert second["graded"] == 6 and second["unanswered"] == 0 and _kept(tmp_path) == CORRECT


def test_a_tls_failure_is_retried_then_recorded(tmp_path, problem_file, caplog):
    """An https:// endpoint whose server does not speak TLS: every try fails in the TLS layer. Lost:
    nothing: each problem is recorded as failed and left for the next run. Seen: one line per try
    naming the SSL error, one per problem saying it will be asked again."""
    with FaultyTeacher() as teacher:
        url = teacher.url.replace("http://", "https://")
        summary = distill.run_distill(_config(url, problem_file, max_retries=1), tmp_path)
        assert teacher.requests() == ["(TLS handshake)"] * 12  # 6 problems x (1 try + 1 retry)
    assert summary["failed_requests"] == 6 and summary["unanswered"] == 6
    failed = _journal(tmp_path, "failed")
    assert len(failed) == 6 and all("SSL" in r["error"] for r in failed), failed[0]["error"]
    warnings = _distill_warnings(caplog)
    assert len(warnings) == 12 and all("\n" not in w for w in warnings)


def test_a_rejected_request_stops_the_run_and_keeps_every_reply(tmp_path, problem_file):
    """The endpoint answers 404 to one problem while two others hang. Lost: nothing: the three replies
    that arrived are in the journal; the run stops at once (it does not wait for the hanging requests,
    and before it waited for every pending request and then threw their replies away). Seen: one line."""
    plan = {PROBLEMS[3]: ["late_404"], PROBLEMS[4]: ["hang"], PROBLEMS[5]: ["hang"]}
    with FaultyTeacher(plan) as teacher:
        start = time.monotonic()
        with pytest.raises(distill.EndpointRejected) as info:
            distill.run_distill(_config(teacher.url, problem_file, timeout=25.0), tmp_path)
        elapsed = time.monotonic() - start
    assert elapsed < 5, elapsed
    assert "\n" not in str(info.value) and "HTTP 404" in str(info.value) and "distill.model" in str(info.value)
    assert sorted(r["problem"] for r in _journal(tmp_path, "reply")) == sorted(PROBLEMS[:3])
    with FaultyTeacher() as teacher:
        summary = distill.run_distill(_config(teacher.url, problem_file), tmp_path)
        assert sorted(teacher.requests()) == sorted(PROBLEMS[3:])  # nothing asked twice
    assert summary["graded"] == 6 and _kept(tmp_path) == CORRECT


def test_an_exception_while_grading_keeps_the_reply(tmp_path, problem_file, monkeypatch):
    """The grader raises on one reply. Lost: nothing: that reply was written before grading began, and
    the next run grades it without asking the teacher again."""
    real_grade = distill._grade

    def grade_or_fail(cfg, record):
        if record["problem"] == PROBLEMS[1]:
            raise RuntimeError("grader bug")
        return real_grade(cfg, record)

    monkeypatch.setattr(distill, "_grade", grade_or_fail)
    with FaultyTeacher() as teacher, pytest.raises(RuntimeError, match="grader bug"):
        distill.run_distill(_config(teacher.url, problem_file, concurrency=1), tmp_path)
    assert PROBLEMS[1] in [r["problem"] for r in _journal(tmp_path, "reply")]
    monkeypatch.setattr(distill, "_grade", real_grade)
    answered = {r["problem"] for r in _journal(tmp_path, "reply")}
    with FaultyTeacher() as teacher:
        summary = distill.run_distill(_config(teacher.url, problem_file), tmp_path)
        assert sorted(teacher.requests()) == sorted(set(PROBLEMS) - answered)
    assert summary["graded"] == 6 and _kept(tmp_path) == CORRECT


class FakeProxy:
    """An HTTP proxy on 127.0.0.1 that relays to the target and records each request line: absolute-URL
    requests ("POST http://host:port/path HTTP/1.1") and CONNECT tunnels ("CONNECT host:port HTTP/1.0").
    It stops by itself after `lifetime` seconds."""

    def __init__(self, lifetime: float = 30.0):
        self.request_lines: list[str] = []
        self.proxy_authorization: list[str] = []
        self.stopped = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set() and time.monotonic() < self._deadline:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()
        self._listener.close()

    def _handle(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            self.request_lines.append(request_line)
            self.proxy_authorization += [line.split(":", 1)[1].strip() for line in header_lines
                                         if line.lower().startswith("proxy-authorization:")]
            method, target, version = request_line.split(" ")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)), timeout=10)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # forward with the origin-form request line, as a real proxy does
                parts = urllib.parse.urlsplit(target)
                upstream = socket.create_connection((parts.hostname, parts.port), timeout=10)
                kept = [line for line in header_lines if not line.lower().startswith("proxy-authorization:")]
                upstream.sendall("\r\n".join([f"{method} {parts.path} {version}", *kept]).encode("latin-1")
                                 + b"\r\n\r\n")
            upstream.sendall(rest)
            pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
            pump.start()
            self._pump(client, upstream)
            pump.join(10)
        except OSError:
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.stopped.set()
        self._thread.join(5)

    def __enter__(self) -> FakeProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


def test_the_environments_proxy_is_used_and_no_proxy_bypasses_it(tmp_path, problem_file, monkeypatch):
    """http_proxy carries every request of an http endpoint (as absolute-URL requests, with the proxy's
    credentials); no_proxy listing the host sends them directly; https_proxy carries an https endpoint
    through a CONNECT tunnel (the fake teacher does not speak TLS, so the try then fails in the TLS
    layer, as in test_a_tls_failure_is_retried_then_recorded); a socks5 proxy is refused in one line
    before any request. Before, distill ignored the proxy settings. About 5 s."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    with FaultyTeacher() as teacher, FakeProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url.replace("http://", "http://user:p%40ss@"))
        summary = distill.run_distill(_config(teacher.url, problem_file), tmp_path / "proxied")
        assert summary["graded"] == 6 and _kept(tmp_path / "proxied") == CORRECT
        assert len(proxy.request_lines) == 6
        assert all(line == f"POST {teacher.url}/chat/completions HTTP/1.1" for line in proxy.request_lines)
        assert set(proxy.proxy_authorization) == {"Basic dXNlcjpwQHNz"}  # base64("user:p@ss")

        monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
        summary = distill.run_distill(_config(teacher.url, problem_file), tmp_path / "direct")
        assert summary["graded"] == 6 and len(proxy.request_lines) == 6 and len(teacher.requests()) == 12

        monkeypatch.delenv("no_proxy")
        monkeypatch.setenv("https_proxy", proxy.url)
        https_cfg = _config(teacher.url.replace("http://", "https://"), problem_file, max_retries=0)
        with pytest.raises(distill.RequestFailed, match="SSL"):
            distill.request_completion(https_cfg, [{"role": "user", "content": PROBLEMS[0]}])
        port = urllib.parse.urlsplit(teacher.url).port
        assert proxy.request_lines[6:] == [f"CONNECT 127.0.0.1:{port} HTTP/1.0"]  # http.client's CONNECT
        assert teacher.requests()[-1] == "(TLS handshake)"  # the tunnel reached the teacher

        monkeypatch.setenv("http_proxy", "socks5://127.0.0.1:1080")
        with pytest.raises(distill.DistillError, match="speaks only to http:// proxies") as info:
            distill.run_distill(_config(teacher.url, problem_file), tmp_path / "socks")
        assert "\n" not in str(info.value) and len(teacher.requests()) == 13


_DISTILL_CHILD = textwrap.dedent("""
    import sys
    from jaxmath import distill
    cfg = distill.DistillConfig(endpoint=sys.argv[1], sources=(sys.argv[2],), concurrency=6, max_retries=3,
                                backoff_seconds=0.05, timeout=25.0, api_key_env="")
    distill.run_distill(cfg, sys.argv[3])
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_run_then_a_rerun_loses_and_repeats_nothing(tmp_path, problem_file, sig):
    """The distill process is killed (or Ctrl-C'd) while three requests hang and three replies (each
    after a 500, a truncated body or a garbage status line) have arrived. Lost: nothing: every reply the
    teacher delivered is in the journal, and the rerun asks exactly the three unanswered problems.
    Seen: on Ctrl-C, the process stops within seconds (not after the hanging requests) with one line
    saying where the replies are and to rerun the command."""
    plan = dict(zip(PROBLEMS, [["500"], ["truncated"], ["bad_status"], ["hang"], ["hang"], ["hang"]]))
    workdir = tmp_path / "run"
    with FaultyTeacher(plan, lifetime=60) as teacher:
        child = subprocess.Popen([sys.executable, "-c", _DISTILL_CHILD, teacher.url, problem_file, str(workdir)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_child_env())
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                    len(teacher.delivered) == 3 and len(teacher.requests()) == 9  # 3 x (fault, ok) + 3 hangs
                    and (workdir / "traces.jsonl.attempts.jsonl").is_file() and len(_journal(workdir, "reply")) == 3):
                time.sleep(0.05)
            assert len(_journal(workdir, "reply")) == 3, "the child never got the three answerable replies"
            child.send_signal(sig)
            signalled = time.monotonic()
            _, stderr = child.communicate(timeout=20)
            stop_seconds = time.monotonic() - signalled
        finally:
            if child.poll() is None:
                child.kill()
        delivered = sorted(teacher.delivered)
    assert child.returncode != 0
    assert sorted(r["problem"] for r in _journal(workdir, "reply")) == delivered == sorted(PROBLEMS[:3])
    if sig == signal.SIGINT:
        assert stop_seconds < 10, stop_seconds
        stopping = [line for line in stderr.splitlines() if "distill: stopping (KeyboardInterrupt)" in line]
        assert len(stopping) == 1 and "run the same command" in stopping[0]
    with FaultyTeacher() as teacher:
        summary = distill.run_distill(_config(teacher.url, problem_file), workdir)
        assert sorted(teacher.requests()) == sorted(PROBLEMS[3:])
    assert summary["graded"] == 6 and summary["kept"] == 4 and _kept(workdir) == CORRECT


# -- checkpoints ------------------------------------------------------------------------------------


def _big_state(step: int):
    """A train state whose parameter data is large enough to sit in its own data file (256 KiB)."""
    params = {"w": jax.random.normal(jax.random.key(step), (256, 256), jnp.float32), "b": jnp.ones((300,))}
    return _train_state(step=step, params=params)


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    path = _largest_file(step_dir / "params")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_bit(step_dir: Path) -> None:
    path = _largest_file(step_dir / "params")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _delete_a_file(step_dir: Path) -> None:
    _largest_file(step_dir / "opt_state").unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_one_bit, _delete_a_file], ids=["truncated", "bit-flip", "deleted"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    """Lost: only the damaged step's progress; it is kept as 7.damaged, never deleted, and the restore
    returns step 5 bit for bit. Seen: one warning line naming the directory, what is wrong and the
    step resumed from (with on_damaged="refuse", one error line and nothing changed). A flipped bit in
    the parameter data used to restore silently as a wrong value."""
    five, seven = _big_state(5), _big_state(7)
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, five)
        manager.save(7, seven)
    damage(tmp_path / "7")
    with CheckpointManager(tmp_path, on_damaged="refuse") as manager, pytest.raises(DamagedCheckpointError) as info:
        manager.restore(target=seven)
    assert "\n" not in str(info.value) and str(tmp_path / "7") in str(info.value) and "[5]" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "7"]
    # The failed read finished every read it started: none is left pending in orbax's closed event loop
    # (before, the garbage collector later printed each as "Exception ignored ... Encountered error while
    # reading array index", in whatever test ran then).
    assert _abandoned_orbax_tasks() == []
    caplog.clear()
    with CheckpointManager(tmp_path) as manager:
        restored = manager.restore(target=seven)
    assert restored.step == 5 and restored.data_cursor == five.data_cursor
    assert_trees_bit_equal((restored.params, restored.opt_state), (five.params, five.opt_state))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "7.damaged"]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    message = loud[0].getMessage()
    assert "\n" not in message and f"checkpoint {tmp_path / '7'} is damaged" in message
    assert "renamed it to 7.damaged and resuming from step 5" in message
    if damage is _flip_one_bit:
        assert "array params/w differs from its saved checksum" in message


def _abandoned_orbax_tasks() -> list[str]:
    """Tasks still pending in an event loop that is already closed: work nothing will ever finish."""
    import asyncio
    import gc

    return [task.get_coro().__qualname__ for task in gc.get_objects()
            if isinstance(task, asyncio.Task) and not task.done() and task.get_loop().is_closed()]


@pytest.mark.slow  # three SFT runs
def test_sft_on_damaged_setting_refuses_or_falls_back(tmp_path):
    """sft.on_damaged (and, through the same CheckpointManager argument, rl.on_damaged), and
    runs.init_from_run, which always refuses: a bit flipped in the newest SFT checkpoint (step 2).
    Lost: nothing: with "refuse", the run and the init stop with one line and nothing is renamed;
    with "fall_back", the run resumes from step 1, keeps 2.damaged and finishes (keep_last=2 then
    drops 1). About 20 s on a quiet machine."""
    from jaxmath import runs, sft
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.optim import OptimizerConfig
    from tests.test_sft import _documents, _model

    docs = _documents(8, seed=3)
    lora = LoRAConfig(rank=4, alpha=8)
    optimizer = OptimizerConfig(learning_rate=1e-2, schedule="constant")
    settings = dict(batch_size=2, max_seq_len=32, lora=lora, optimizer=optimizer, checkpoint_every=1, log_every=0,
                    export=False, remat=False)
    sft.run_sft(_model(), docs, sft.SFTConfig(steps=2, **settings), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    _flip_one_bit(checkpoints / "2")
    with pytest.raises(DamagedCheckpointError) as info:
        sft.run_sft(_model(), docs, sft.SFTConfig(steps=3, on_damaged="refuse", **settings), tmp_path)
    assert "\n" not in str(info.value) and "on_damaged='refuse'" in str(info.value)
    with pytest.raises(DamagedCheckpointError, match="on_damaged='refuse'"):
        runs.init_from_run(_model(), str(tmp_path), lora, optimizer, seed=0)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]
    assert _abandoned_orbax_tasks() == []
    result = sft.run_sft(_model(), docs, sft.SFTConfig(steps=3, **settings), tmp_path)
    assert result["steps"] == 3 and sorted(p.name for p in checkpoints.iterdir()) == ["2", "2.damaged", "3"]
    records = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-2:] == [2, 3]  # step 2 trained again from checkpoint 1
    with pytest.raises(ValueError, match="sft.on_damaged must be one of"):
        sft.SFTConfig(steps=3, on_damaged="ignore", **settings)


def test_on_damaged_is_a_config_key_of_grpo_and_sft():
    from jaxmath import sections
    from jaxmath.config import defaults

    grpo = defaults("grpo")
    assert grpo.rl.on_damaged == "fall_back" and defaults("sft").sft.on_damaged == "fall_back"
    grpo.rl.on_damaged = "refuse"
    grpo.optimizer.learning_rate = 1e-6
    assert sections.grpo_configs(grpo)[0].on_damaged == "refuse"
    grpo.rl.on_damaged = "ignore"
    with pytest.raises(ValueError, match="rl.on_damaged must be one of"):
        sections.grpo_configs(grpo)


_FULL_DISK_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys, threading
    from orbax.checkpoint._src.futures.future import _SignalingThread
    from tests.test_faults import _abandoned_orbax_tasks, _big_state
    from tests.test_checkpoint import assert_trees_bit_equal
    from jaxmath.checkpoint import CheckpointError, CheckpointManager
    directory, how = sys.argv[1:3]
    manager = CheckpointManager(directory, async_save=how.endswith("async"))
    one = _big_state(1)
    manager.save(1, one)
    manager.wait_until_finished()
    if how.startswith("file-size-limit"):  # every later write past 64 KiB fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    result = {}
    try:
        manager.save(2, _big_state(2))
        manager.wait_until_finished()  # where an async save's failure surfaces
    except CheckpointError as e:
        result["error"] = str(e)
    # Nothing of the failed save runs on: no orbax writer thread, no task pending in a closed loop.
    result["running"] = [t.name for t in threading.enumerate() if isinstance(t, _SignalingThread)]
    result["running"] += _abandoned_orbax_tasks()
    result["entries"] = sorted(os.listdir(directory))
    restored = manager.restore(target=one)
    assert_trees_bit_equal((restored.params, restored.opt_state), (one.params, one.opt_state))
    result["restored_step"] = restored.step
    manager.close()
    print("RESULT " + json.dumps(result))
""")


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "file-size-limit", "file-size-limit-async"])
def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, how):
    """A checkpoint write fails half-way: on a 640 KiB tmpfs, room for one checkpoint (mounted in a user
    and mount namespace; skipped where the machine forbids one), and under a 64 KiB file-size limit
    (EFBIG; runs anywhere), once with an async save (orbax only logs a failure in its background
    thread; the manager turns it into the same error at `wait_until_finished`).
    Lost: nothing: step 1 restores bit for bit and the partial step 2 is removed. Seen: one line naming
    the step directory and the OS error, and no orbax traceback (before: 339 lines, 11 tracebacks)."""
    directory = tmp_path / "checkpoints"
    command = [sys.executable, "-c", _FULL_DISK_CHILD, str(directory), how]
    if how == "tmpfs":
        if not _can_mount_tmpfs():
            pytest.skip("this machine does not allow a user+mount namespace with a tmpfs (unshare)")
        directory.mkdir()
        script = f'mount -t tmpfs -o size=640k tmpfs "{directory}" && exec "$@"'
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_child_env())
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    reason = "No space left on device" if how == "tmpfs" else "File too large"
    assert result["error"].startswith(f"could not write checkpoint step 2 to {directory / '2'}: {reason}")
    assert f"the previous checkpoint ({directory / '1'}) is intact" in result["error"]
    assert "\n" not in result["error"]
    assert result["entries"] == ["1"] and result["restored_step"] == 1 and result["running"] == []
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, out.stderr[-4000:]
    # No orbax error cut to a line (one from a writer thread still running after the failure was
    # reported) and no warning about metrics nobody asked for.
    assert "orbax:" not in out.stderr and "tracked_metric" not in out.stderr, out.stderr[-4000:]


# -- GRPO killed during a step and during a checkpoint write ----------------------------------------

_GRPO_CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax, numpy as np
    from flax import nnx
    mode, workdir, out = sys.argv[1:4]
    if mode == "kill_in_step_3":  # SIGKILL at the third rollout: during step 3, after checkpoint 2
        from jaxmath.rollout.jax_sampler import JaxSampler
        generate, calls = JaxSampler.generate, []
        def generate_then_die(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return generate(self, *args, **kwargs)
        JaxSampler.generate = generate_then_die
    if mode == "kill_in_save_3":  # SIGKILL while checkpoint 3 is being written (params done, opt_state not)
        from orbax.checkpoint._src.path import atomicity
        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize_then_die(self, *args, **kwargs):
            final = self.get_final()
            if final.name == "opt_state" and final.parent.name.startswith("3."):
                os.kill(os.getpid(), signal.SIGKILL)
            return await finalize(self, *args, **kwargs)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_die
    from tests.test_grpo_loop import _run  # the demo-sized model and loop set-up
    model, _ = _run(workdir, 4, checkpoint_every=1)
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(nnx.state(model))])
""")


@pytest.mark.slow
def test_grpo_killed_in_a_step_and_in_a_checkpoint_write_resumes_exactly(tmp_path):
    """Four GRPO steps on the demo-sized model, checkpointing every step: run A is SIGKILLed during
    step 3; a bit is flipped in its checkpoint 2; run B resumes (checkpoint 2 is found damaged, renamed,
    and B starts from 1), and is SIGKILLed while writing checkpoint 3; run C resumes from B's
    checkpoint 2 and finishes. Lost: nothing: C's weights and metrics equal an uninterrupted run's bit
    for bit. Seen: one warning line for the damaged checkpoint. About 2-3 minutes on 2 cores."""
    env = _child_env()
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

    def start(mode, workdir, out=None):
        return subprocess.Popen([sys.executable, "-c", _GRPO_CHILD, mode, str(workdir), str(out or tmp_path / "x")],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(child):
        try:
            _, stderr = child.communicate(timeout=600)
        finally:
            if child.poll() is None:
                child.kill()
        return child.returncode, stderr

    straight = start("plain", tmp_path / "straight", tmp_path / "straight.npz")
    code, stderr = finish(start("kill_in_step_3", tmp_path / "run"))
    assert code == -signal.SIGKILL, stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]
    _flip_one_bit(checkpoints / "2")

    code, stderr = finish(start("kill_in_save_3", tmp_path / "run"))
    assert code == -signal.SIGKILL, stderr[-3000:]
    damaged = [line for line in stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "renamed it to 2.damaged and resuming from step 1" in damaged[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert {"1", "2", "2.damaged"} <= {p.name for p in checkpoints.iterdir()}
    assert any(p.name.startswith("3.orbax-checkpoint-tmp") for p in checkpoints.iterdir())  # killed mid-write

    code, stderr = finish(start("plain", tmp_path / "run", tmp_path / "resumed.npz"))
    assert code == 0, stderr[-3000:]
    code, stderr = finish(straight)
    assert code == 0, stderr[-3000:]
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert len(a.files) == len(b.files) > 0
        for name in a.files:
            np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8), err_msg=name)
    metrics = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("straight", "run")]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    for a, b in zip(*metrics):
        assert (a["loss"], a["reward_mean"], a["grad_norm"]) == (b["loss"], b["reward_mean"], b["grad_norm"])
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "4"
