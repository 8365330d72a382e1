"""jaxmath.distill against a local OpenAI-compatible server that answers from a fixed table.

The server (http.server on 127.0.0.1, port chosen by the OS) knows the reply to each problem; some
replies are right, some wrong, one has no \\boxed{}. It can fail a request with HTTP 500 and can
stall requests, so a run can be killed while replies are still outstanding.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jaxmath import distill
from jaxmath.data.prompts import INSTRUCTION

# problem -> (gold answer, the teacher's reply, graded correct?)
TABLE = {
    "What is 2+3?": ("5", "2 plus 3 is \\boxed{5}.", True),
    "What is 7*6?": ("42", "Seven sixes: \\boxed{42}", True),
    "Simplify 2/4.": ("\\frac{1}{2}", "Divide by 2: \\boxed{\\dfrac{1}{2}}", True),
    "What is 10-4?": ("6", "It is \\boxed{5}.", False),
    "What is 3^2?": ("9", "The answer is nine, 9.", False),  # no \boxed{}: wrong under the study's reward
    "What is 1+1?": ("2", "Clearly \\boxed{2}, since one and one make two.", True),
}
SOURCES = {"alpha": list(TABLE)[:3], "beta": list(TABLE)[3:]}


class Teacher:
    """The table server; `fail_once` problems get one HTTP 500, `stall` problems hang until stopped."""

    def __init__(self, fail_once=(), stall=()):
        self.fail_once, self.stall = set(fail_once), set(stall)
        self.requests: list[str] = []
        self.release = threading.Event()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                assert self.path == "/v1/chat/completions" and user.endswith(INSTRUCTION)
                problem = user[: -len(INSTRUCTION)].rstrip()
                teacher.requests.append(problem)
                if problem in teacher.fail_once:
                    teacher.fail_once.discard(problem)
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"injected failure")
                    return
                if problem in teacher.stall:
                    teacher.release.wait(60)
                reply = {"choices": [{"message": {"role": "assistant", "content": TABLE[problem][1]},
                                      "finish_reason": "stop"}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def problem_files(tmp_path):
    paths = []
    for source, problems in SOURCES.items():
        path = tmp_path / f"{source}.jsonl"
        path.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": TABLE[p][0]}) + "\n"
                                for i, p in enumerate(problems)))
        paths.append(str(path))
    return paths


def _config(url, sources, **overrides):
    settings = dict(concurrency=2, max_retries=2, backoff_seconds=0.01, timeout=20, api_key_env="")
    return distill.DistillConfig(endpoint=url, sources=tuple(sources), **{**settings, **overrides})


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _journal(path, kind):
    return [r for r in _rows(path) if r.get("kind") == kind]


def test_only_correct_traces_are_kept_and_a_server_error_is_retried(tmp_path, problem_files):
    teacher = Teacher(fail_once={"What is 7*6?"})
    try:
        summary = distill.run_distill(_config(teacher.url, problem_files), tmp_path / "run")
    finally:
        teacher.close()
    kept = _rows(tmp_path / "run" / "traces.jsonl")
    assert sorted(r["problem"] for r in kept) == sorted(p for p, (_, _, ok) in TABLE.items() if ok)
    assert all(r["correct"] and r["trace"] == TABLE[r["problem"]][1] for r in kept)
    assert teacher.requests.count("What is 7*6?") == 2  # the 500, then the retry that succeeded
    journal = tmp_path / "run" / "traces.jsonl.attempts.jsonl"
    assert len(_journal(journal, "reply")) == len(_journal(journal, "grade")) == len(TABLE)
    assert summary["kept"] == 4 and summary["total"] == 6 and summary["failed_requests"] == 0
    assert summary["per_source"]["alpha"]["kept"] == 3 and summary["per_source"]["beta"]["kept"] == 1
    lengths = sorted(len(TABLE[p][1]) for p, (_, _, ok) in TABLE.items() if ok)
    assert summary["median_chars"] == (lengths[1] + lengths[2]) / 2
    assert json.loads((tmp_path / "run" / "traces.jsonl.summary.json").read_text())["kept"] == 4


def test_requests_that_keep_failing_are_left_for_the_next_run(tmp_path, problem_files):
    teacher = Teacher(fail_once={"What is 2+3?"})
    try:
        cfg = _config(teacher.url, problem_files, max_retries=0)
        first = distill.run_distill(cfg, tmp_path)
        assert first["failed_requests"] == 1 and first["kept"] == 3 and first["unanswered"] == 1
        failed = _journal(tmp_path / "traces.jsonl.attempts.jsonl", "failed")
        assert [r["id"] for r in failed] == ["alpha/p0"] and "HTTP 500" in failed[0]["error"]
        teacher.requests.clear()
        second = distill.run_distill(cfg, tmp_path)
    finally:
        teacher.close()
    assert teacher.requests == ["What is 2+3?"]  # only the problem without a graded reply is asked again
    assert second["kept"] == 4 and second["failed_requests"] == 0
    ids = [r["id"] for r in _rows(tmp_path / "traces.jsonl")]
    assert len(ids) == len(set(ids)) == 4


def test_a_killed_run_resumes_without_duplicates(tmp_path, problem_files):
    """A run in a child process is killed (SIGKILL) while requests hang; the rerun asks only the rest."""
    stalled = set(SOURCES["beta"])
    teacher = Teacher(stall=stalled)
    workdir = tmp_path / "run"
    attempts = workdir / "traces.jsonl.attempts.jsonl"
    script = (
        "import sys; from jaxmath import distill; "
        f"cfg = distill.DistillConfig(endpoint={teacher.url!r}, sources={tuple(problem_files)!r}, concurrency=1, "
        "max_retries=0, timeout=60, api_key_env=''); distill.run_distill(cfg, sys.argv[1])"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(workdir)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "JAXMATH_NO_PROGRESS": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (len(teacher.requests) >= 4 and attempts.is_file()
                                              and len(_journal(attempts, "grade")) == 3):
            time.sleep(0.05)
        assert len(_journal(attempts, "grade")) == 3, "the child never got through the fast problems"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
        teacher.close()
    assert not (workdir / "traces.jsonl").exists()  # the kept file is only written at the end
    with attempts.open("a") as f:
        f.write('{"id": "beta/p0", "tra')  # as if killed half-way through a write

    teacher = Teacher()
    try:
        cfg = _config(teacher.url, problem_files)
        summary = distill.run_distill(cfg, workdir)
    finally:
        teacher.close()
    assert sorted(teacher.requests) == sorted(stalled)  # nothing graded before the kill is asked again
    ids = [r["id"] for r in _rows(workdir / "traces.jsonl")]
    assert len(ids) == len(set(ids)) == 4 and summary["kept"] == 4 and summary["graded"] == 6


def test_client_errors_are_not_retried_and_name_the_fix(tmp_path):
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            calls.append(1)
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"model not found")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = _config(f"http://127.0.0.1:{server.server_address[1]}", ["unused.jsonl"])
        with pytest.raises(distill.EndpointRejected, match="HTTP 404.*distill.endpoint"):
            distill.request_completion(cfg, [{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
        server.server_close()
    assert calls == [1]
    assert distill.chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert distill.chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError, match="distill.endpoint is empty"):
        distill.DistillConfig(endpoint="")


def test_two_passes_into_one_output_keep_both(tmp_path, problem_files):
    """Issue 15: a second pass (another source) adds to traces.jsonl instead of replacing it, and a
    pass over problems already answered asks nothing."""
    alpha, beta = problem_files
    teacher = Teacher()
    try:
        first = distill.run_distill(_config(teacher.url, [alpha]), tmp_path)
        assert first["kept"] == 3 and sorted(teacher.requests) == sorted(SOURCES["alpha"])
        second = distill.run_distill(_config(teacher.url, [beta]), tmp_path)
        teacher.requests.clear()
        third = distill.run_distill(_config(teacher.url, [alpha, beta]), tmp_path)
    finally:
        teacher.close()
    assert second["kept"] == 1 and second["total"] == 3
    assert second["traces_file"] == {"kept": 4, "per_source": {"alpha": 3, "beta": 1}}
    assert teacher.requests == []  # everything was answered by the first two passes
    assert third["kept"] == 4 and third["total"] == 6 and third["graded"] == 6
    kept = _rows(tmp_path / "traces.jsonl")
    assert sorted(r["problem"] for r in kept) == sorted(p for p, (_, _, ok) in TABLE.items() if ok)


def test_journal_of_the_previous_format_is_read(tmp_path, problem_files):
    """Rows written before the journal had kinds are graded replies: kept, and not asked again."""
    alpha, _ = problem_files
    problem = SOURCES["alpha"][0]
    old = {"id": "alpha/p0", "source": "alpha", "problem": problem, "answer": TABLE[problem][0],
           "trace": TABLE[problem][1], "correct": True, "extracted": "5", "finish_reason": "stop", "model": "m"}
    (tmp_path / "traces.jsonl.attempts.jsonl").write_text(json.dumps(old) + "\n")
    teacher = Teacher()
    try:
        summary = distill.run_distill(_config(teacher.url, [alpha]), tmp_path)
    finally:
        teacher.close()
    assert sorted(teacher.requests) == sorted(SOURCES["alpha"][1:])
    assert summary["kept"] == 3


def test_one_run_per_output(tmp_path):
    with distill.Journal(tmp_path / "a.jsonl"):
        with pytest.raises(distill.DistillError, match="another distillation run"):
            distill.Journal(tmp_path / "a.jsonl")
    distill.Journal(tmp_path / "a.jsonl").close()  # free again once the first run ends


def test_sources_with_a_count_and_the_chosen_subset():
    from jaxmath.data.datasets import Example

    assert distill.split_source("olympiadbench:500") == ("olympiadbench", 500)
    assert distill.split_source("/d/x.jsonl:20") == ("/d/x.jsonl", 20)
    assert distill.split_source("math_train_hard") == ("math_train_hard", 0)
    with pytest.raises(ValueError, match="count after ':'"):
        distill.DistillConfig(endpoint="http://h/v1", sources=("olympiadbench:0",))
    examples = [Example(f"e{i}", f"p{i}", str(i), {}) for i in range(50)]
    chosen = distill.select_problems(examples, 20)
    assert len(chosen) == 20 and chosen == sorted(chosen, key=examples.index)  # file order kept
    # The subset depends on the ids only, not on the order of the file.
    assert {e.id for e in distill.select_problems(examples[::-1], 20)} == {e.id for e in chosen}
    assert distill.select_problems(examples, 0) == examples == distill.select_problems(examples, 99)


def test_default_sources_are_the_studys(full_data_dir):
    """MATH L4-5 (3,994 less the 2 with an empty gold answer) and 500 of the 572 OlympiadBench numerical
    problems, ids unique."""
    cfg = distill.DistillConfig(endpoint="http://h/v1", data_dir=str(full_data_dir))
    problems = distill.load_problems(cfg)
    per_source = {s: sum(p["source"] == s for p in problems) for s in ("math_train_hard", "olympiadbench")}
    assert per_source == {"math_train_hard": 3992, "olympiadbench": 500}
    assert len({p["id"] for p in problems}) == len(problems)
