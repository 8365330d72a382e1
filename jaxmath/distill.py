"""Teacher traces for SFT through any OpenAI-compatible chat endpoint, graded, filtered, never lost.

    python -m jaxmath.main --config=configs/distill.py --config.distill.endpoint=http://HOST:8000/v1

The study served Qwen3-235B-A22B-Instruct-2507 with vLLM, asked it every MATH level 4-5 problem
and 500 OlympiadBench numerical problems, and kept the 3,825 answers graded correct. Here each
problem is sent as the same user turn evaluation uses (`jaxmath.data.prompts.user_turn`: the
problem, then the \\boxed{} instruction); the reply is graded by the RL reward's own function
(`jaxmath.reward.grade_completion`: the last \\boxed{} against the gold answer), so a kept trace is
one the reward and the evaluation would also call correct.

Sources: data set names of `jaxmath.data.datasets.FILES` or .jsonl paths, each optionally
`NAME:COUNT` for COUNT problems chosen by `select_problems` (the COUNT whose sha256(id) is smallest,
kept in file order: deterministic, independent of file order, and the same subset on every machine).
The study's "500 OlympiadBench numerical problems" is `olympiadbench:500`: 500 of the 572 problems of
the OlympiadBench *evaluation* file, so an SFT model's OlympiadBench score is partly on problems its
traces came from, as in the study.

Files (in the run directory unless `output` is absolute):
    <output>.attempts.jsonl  the journal, append-only: every reply as it arrives ("reply" rows, written
                             and fsynced before it is graded), its grade ("grade" rows), and every
                             request that failed past its retries ("failed" rows)
    <output>                 the correct traces of every pass into this output, one per problem:
                             {id, source, problem, answer, trace, correct, extracted, finish_reason,
                             model}; what `sft.train_files` reads. Rebuilt from the journal at the end
                             of each run, so a second pass (another source, more problems) adds to it
                             and never drops a trace an earlier pass kept.
    <output>.summary.json    this run's problems: kept / total, median trace length, per source; and
                             the traces file's totals over all passes

What cannot be lost:
- A problem with a reply in the journal is never asked again (resume after a crash, kill or Ctrl-C:
  run the same command). A failed request is recorded and asked again by the next run.
- Every transport failure is retried with exponential backoff (capped at 60 s, +-50% jitter, or the
  server's Retry-After): connection refused or reset, TLS errors, a truncated body (IncompleteRead),
  a garbage status line (BadStatusLine), a malformed reply, HTTP 408/425/429/5xx, and a try that runs
  past `timeout`, which is wall-clock for the whole try (a server trickling bytes cannot hold a request
  longer: a watchdog shuts the socket at the deadline). HTTP 401/403/404 stop the run (`EndpointRejected`:
  the endpoint, model or key is wrong for every problem); other 4xx fail that problem without retries.
- Workers write their replies themselves, so an exception anywhere else (grading, another request,
  Ctrl-C) cannot discard a reply that arrived; on such an exception queued requests are cancelled,
  in-flight ones are cut off at once (not waited for), and the exception propagates.
- One run per output at a time (an exclusive lock on the journal), so two runs cannot ask twice.

Only the standard library talks HTTP (http.client, a thread pool), so nothing beyond jaxmath is needed
on the machine that runs this. Proxies come from the environment as urllib and curl read them:
http_proxy / https_proxy (or upper case) name an http:// proxy, no_proxy lists hosts reached directly;
an https endpoint goes through the proxy in a CONNECT tunnel (TLS end to end), an http one as an
absolute-URL request. Credentials in the proxy URL are sent as Proxy-Authorization (Basic).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import base64
import hashlib
import http.client
import json
import os
import random
import statistics
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from absl import logging

RETRY_STATUS = (408, 425, 429)  # plus every 5xx
REJECT_STATUS = (401, 403, 404)  # wrong endpoint, model or key: the same for every problem
MAX_BACKOFF_SECONDS = 60.0
# A connect cannot be cut off by the watchdog (there is no socket to shut yet), so it gets its own,
# shorter bound: a stopping run waits at most this long for a connect in progress.
CONNECT_TIMEOUT_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """endpoint:     base URL of an OpenAI-compatible server ("http://host:8000/v1"; a full
                     ".../chat/completions" URL is used as is)
    model:           the served model name sent in each request
    api_key_env:     environment variable holding the API key ("" or unset: no Authorization header)
    sources:         data set names of jaxmath.data.datasets.FILES under data_dir, or .jsonl paths;
                     "NAME:COUNT" asks COUNT of them, chosen by `select_problems`
    limit:           > 0: the first `limit` problems of each source (after any COUNT), for smoke runs
    concurrency:     requests in flight
    max_retries:     retries per request after the first try
    backoff_seconds: the wait before the first retry; it doubles each time (capped at 60 s, with +-50%
                     jitter so clients do not retry in lockstep)
    timeout:         wall-clock seconds per try: connect, send, wait and read together
                     (the endpoint is reached through the http_proxy / https_proxy of the environment
                     unless no_proxy covers its host; see the module docstring)
    temperature, top_p, max_tokens: sampling; the study does not state them
    output:          the traces file; relative paths are under the run directory
    system_prompt:   optional system turn; instruction is appended to each problem
    grade_timeout:   seconds per answer comparison
    """

    endpoint: str
    model: str = "Qwen/Qwen3-235B-A22B-Instruct-2507"
    api_key_env: str = "OPENAI_API_KEY"
    sources: tuple[str, ...] = ("math_train_hard", "olympiadbench:500")
    data_dir: str = "data"
    limit: int = 0
    concurrency: int = 32
    max_retries: int = 6
    backoff_seconds: float = 2.0
    timeout: float = 900.0
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 8192
    output: str = "traces.jsonl"
    system_prompt: str = ""
    grade_timeout: float = 5.0

    def __post_init__(self):
        if not self.endpoint:
            raise ValueError("distill.endpoint is empty; pass --config.distill.endpoint=http://HOST:PORT/v1, the "
                             "address of an OpenAI-compatible server (e.g. `vllm serve "
                             "Qwen/Qwen3-235B-A22B-Instruct-2507`)")
        if urllib.parse.urlsplit(chat_url(self.endpoint)).scheme not in ("http", "https"):
            raise ValueError(f"distill.endpoint {self.endpoint!r} must start with http:// or https://")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("distill.concurrency must be >= 1, distill.max_retries >= 0 and distill.timeout > 0")
        from jaxmath.data.datasets import FILES

        for source in self.sources:
            name, _ = split_source(source)
            if not name.endswith(".jsonl") and name not in FILES:
                raise ValueError(f"distill.sources entry {source!r} is neither a data set ({sorted(FILES)}) nor a "
                                 ".jsonl path")


class DistillError(RuntimeError):
    """A distillation run cannot go on; the message is one line saying what to do."""


class RequestFailed(DistillError):
    """One request that did not succeed within its retries (or failed in a way retrying cannot fix)."""


class EndpointRejected(DistillError):
    """The endpoint refused a request in a way that holds for every problem (HTTP 401, 403, 404)."""


class _Stopped(Exception):
    """The run is stopping (Ctrl-C, an error elsewhere): this request gives up at once."""


# -- problems ---------------------------------------------------------------------------------------


def split_source(source: str) -> tuple[str, int]:
    """"olympiadbench:500" -> ("olympiadbench", 500); "math_train_hard" -> ("math_train_hard", 0)."""
    name, colon, count = source.rpartition(":")
    if not colon or not count.isdigit():
        return source, 0
    if int(count) < 1:
        raise ValueError(f"distill.sources entry {source!r}: the count after ':' must be >= 1")
    return name, int(count)


def select_problems(examples: list, count: int) -> list:
    """The `count` examples whose sha256(id) is smallest, in their original order (all if count is 0 or
    covers them). A hash of the id, not a seeded shuffle, so the subset does not depend on the file's
    order or on a random generator's version."""
    if not count or count >= len(examples):
        return list(examples)
    chosen = set(sorted(range(len(examples)), key=lambda i: hashlib.sha256(examples[i].id.encode()).digest())[:count])
    return [ex for i, ex in enumerate(examples) if i in chosen]


def load_problems(cfg: DistillConfig) -> list[dict[str, str]]:
    """[{id, source, problem, answer}] over all sources; ids are prefixed by source to stay unique."""
    from jaxmath.data import datasets

    problems = []
    for source in cfg.sources:
        path, count = split_source(source)
        if path.endswith(".jsonl"):
            name = Path(path).stem
            examples = datasets.read_jsonl(path, source=name, empty_answers="drop")
        else:
            name = path
            examples = datasets.load(path, cfg.data_dir)
        examples = select_problems(examples, count)
        examples = examples[:cfg.limit] if cfg.limit else examples
        problems += [{"id": f"{name}/{ex.id}", "source": name, "problem": ex.problem, "answer": ex.answer}
                     for ex in examples]
    return problems


def messages_for(problem: str, system_prompt: str = "") -> list[dict[str, str]]:
    from jaxmath.data.prompts import user_turn

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": user_turn(problem)}]


# -- one request ------------------------------------------------------------------------------------


def chat_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class _InFlight:
    """The sockets of the tries in progress, so a stopping run can cut them all off at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cutoffs: set = set()
        self.stop = threading.Event()

    def add(self, cutoff) -> None:
        with self._lock:
            self._cutoffs.add(cutoff)
        if self.stop.is_set():
            cutoff()

    def discard(self, cutoff) -> None:
        with self._lock:
            self._cutoffs.discard(cutoff)

    def stop_all(self) -> None:
        self.stop.set()
        with self._lock:
            cutoffs = list(self._cutoffs)
        for cutoff in cutoffs:
            cutoff()


def proxy_for(url: str) -> urllib.parse.SplitResult | None:
    """The http:// proxy the environment names for `url` (http_proxy or https_proxy by its scheme, read
    as urllib reads them), or None when there is none or no_proxy covers the host. Raises DistillError
    for a proxy this client cannot speak to (socks5://, https://)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if proxy_parts.scheme != "http" or not proxy_parts.hostname:
        raise DistillError(f"the environment's {parts.scheme}_proxy is {proxy!r}, but distill speaks only to http:// "
                           f"proxies; set an http:// one, or add {parts.hostname} to no_proxy to connect directly")
    return proxy_parts


def _connect_via(parts: urllib.parse.SplitResult, proxy: urllib.parse.SplitResult | None, timeout: float,
                 headers: dict[str, str]) -> tuple[http.client.HTTPConnection, str]:
    """(an unopened connection, the request target) for the URL `parts`, through `proxy` if given:
    https in a CONNECT tunnel, http as an absolute-URL request. May add Proxy-Authorization to headers."""
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    https = parts.scheme == "https"
    if proxy is None:
        connection_type = http.client.HTTPSConnection if https else http.client.HTTPConnection
        return connection_type(parts.hostname, parts.port, timeout=timeout), path
    auth = {}
    if proxy.username is not None:
        user_pass = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
    if https:
        connection = http.client.HTTPSConnection(proxy.hostname, proxy.port or 80, timeout=timeout)
        connection.set_tunnel(parts.hostname, parts.port or 443, headers=auth)
        return connection, path
    headers.update(auth)
    return http.client.HTTPConnection(proxy.hostname, proxy.port or 80, timeout=timeout), urllib.parse.urlunsplit(
        parts._replace(fragment=""))


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float, in_flight: _InFlight,
          proxy: urllib.parse.SplitResult | None = None):
    """One POST, through `proxy` if given; returns (status, Retry-After header, body bytes). The whole
    try, reading included, ends by `timeout` seconds: a watchdog shuts the socket down then (a socket
    timeout bounds each read only)."""
    parts = urllib.parse.urlsplit(url)
    headers = dict(headers)
    connection, target = _connect_via(parts, proxy, min(timeout, CONNECT_TIMEOUT_SECONDS), headers)
    expired = threading.Event()
    started = time.monotonic()

    def cut_off():
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(2)  # SHUT_RDWR: a blocked recv returns at once
            except OSError:
                pass

    watchdog = threading.Timer(timeout, cut_off)
    watchdog.daemon = True
    in_flight.add(cut_off)
    watchdog.start()
    try:
        connection.connect()
        if expired.is_set():
            raise TimeoutError("connected only after the deadline")
        connection.sock.settimeout(max(0.001, timeout - (time.monotonic() - started)))
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if expired.is_set() and not in_flight.stop.is_set():
            raise TimeoutError(f"no complete reply within distill.timeout={timeout:g} s")
        return response.status, response.getheader("Retry-After"), data
    except (OSError, http.client.HTTPException) as e:
        if in_flight.stop.is_set():
            raise _Stopped() from e
        if expired.is_set():
            raise TimeoutError(f"no complete reply within distill.timeout={timeout:g} s") from e
        raise
    finally:
        watchdog.cancel()
        in_flight.discard(cut_off)
        connection.close()


def _retry_delay(cfg: DistillConfig, attempt: int, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(MAX_BACKOFF_SECONDS, max(0.0, float(retry_after)))
        except ValueError:  # an HTTP date: use our own backoff
            pass
    return min(MAX_BACKOFF_SECONDS, cfg.backoff_seconds * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def request_completion(cfg: DistillConfig, messages: list[dict[str, str]], *, label: str = "",
                       in_flight: _InFlight | None = None) -> dict[str, Any]:
    """One chat completion with retries: returns {"text", "finish_reason"}.

    Raises RequestFailed past the retries (or on a 4xx that retrying cannot fix), EndpointRejected on
    HTTP 401/403/404, and _Stopped when `in_flight` is told to stop.
    """
    in_flight = in_flight or _InFlight()
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                       "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = chat_url(cfg.endpoint)
    proxy = proxy_for(url)
    tries = cfg.max_retries + 1
    last_error, retry_after = "", None
    for attempt in range(tries):
        if attempt:
            delay = _retry_delay(cfg, attempt, retry_after)
            logging.warning("distill: %s try %d of %d failed (%s); retrying in %.1f s", label or url, attempt,
                            tries, last_error, delay)
            if in_flight.stop.wait(delay):
                raise _Stopped()
        retry_after = None
        try:
            status, retry_after, data = _post(url, body, headers, cfg.timeout, in_flight, proxy)
        except (OSError, http.client.HTTPException) as e:  # reset, refused, TLS, timeout, torn replies
            last_error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            continue
        if status != 200:
            detail = " ".join(data[:300].decode("utf-8", "replace").split())
            if status in REJECT_STATUS:
                raise EndpointRejected(f"{url} answered HTTP {status} ({detail}); check distill.endpoint, "
                                       f"distill.model and the key in ${cfg.api_key_env}")
            last_error = f"HTTP {status}: {detail}"
            if status in RETRY_STATUS or status >= 500:
                continue
            raise RequestFailed(f"{url} answered {last_error}; not retried (the request itself was refused)")
        try:
            choice = json.loads(data)["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message.content is {type(text).__name__}, not text")
            return {"text": text, "finish_reason": choice.get("finish_reason")}
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, or not a chat completion
            last_error = " ".join(f"malformed reply ({type(e).__name__}: {e})".split())[:300]
    raise RequestFailed(f"{url}: no answer after {tries} tries; last error {last_error}")


# -- the journal ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """JSONL rows, skipping a torn line left by a killed writer."""
    rows = []
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    logging.warning("distill: %s has a torn line (killed mid-write?); ignoring it", path)
    return rows


def merge_journal(rows: list[dict]) -> dict[str, dict]:
    """{id: record} from journal rows: a record has the reply's fields once a reply arrived, `correct`
    and `extracted` once graded, and `failures` (count) and `error` for failed requests. The first
    reply for an id wins. Rows without "kind" (written before the journal had kinds) are graded replies."""
    records: dict[str, dict] = {}
    for row in rows:
        kind = row.get("kind", "reply")
        record = records.setdefault(row["id"], {"id": row["id"]})
        if kind == "reply" and "trace" not in record:
            record.update({k: v for k, v in row.items() if k != "kind"})
        elif kind == "grade" and "trace" in record:
            record.update(correct=row["correct"], extracted=row["extracted"])
        elif kind == "failed":
            record["failures"] = record.get("failures", 0) + 1
            record["error"] = row.get("error", "")
            record.setdefault("source", row.get("source"))
    return records


class Journal:
    """The append-only attempts file, locked for one run; every row is flushed and fsynced as written."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._file.close()
            raise DistillError(f"{path} is being written by another distillation run; wait for it to finish or "
                               "set a different distill.output") from e
        except OSError as e:  # a file system without locks (some NFS mounts)
            logging.warning("distill: cannot lock %s (%s); run one distillation per output at a time", path, e)
        # A torn last line must not glue onto the next row: start appending on a fresh line.
        if path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()  # releases the lock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the run ----------------------------------------------------------------------------------------


def _grade(cfg: DistillConfig, record: dict) -> dict:
    """The grade row for a reply record: the training reward's verdict (`grade_completion`, the last
    \\boxed{} answer only, as the study's reward)."""
    from jaxmath.reward import grade_completion

    graded = grade_completion(record["trace"], record["answer"], timeout=cfg.grade_timeout)
    return {"kind": "grade", "id": record["id"], "correct": graded.correct, "extracted": graded.answer}


def _ask(cfg: DistillConfig, problem: dict, journal: Journal, in_flight: _InFlight) -> dict | None:
    """Worker: asks one problem and writes the outcome to the journal itself, so nothing that happens
    to the main thread can lose the reply. Returns the reply row, or None if the request failed."""
    try:
        reply = request_completion(cfg, messages_for(problem["problem"], cfg.system_prompt), label=problem["id"],
                                   in_flight=in_flight)
    except _Stopped:
        return None
    except RequestFailed as e:
        journal.append({"kind": "failed", "id": problem["id"], "source": problem["source"], "error": str(e),
                        "model": cfg.model})
        logging.warning("distill: %s failed; the next run asks it again: %s", problem["id"], e)
        return None
    row = {"kind": "reply", **problem, "trace": reply["text"], "finish_reason": reply["finish_reason"],
           "model": cfg.model}
    journal.append(row)
    return row


def _ask_all(cfg: DistillConfig, pending: list[dict], journal: Journal) -> int:
    """Asks every pending problem, grading replies as they come; returns how many requests failed."""
    from jaxmath.metrics import progress

    in_flight = _InFlight()
    pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="distill")
    bar = progress(len(pending), desc="distill")
    failed = 0
    try:
        futures = {pool.submit(_ask, cfg, p, journal, in_flight): p for p in pending}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()  # EndpointRejected or a bug elsewhere: stop (below), keep what arrived
            bar.update(1)
            if row is None:
                failed += 1
            else:
                journal.append(_grade(cfg, row))
    except BaseException as e:
        in_flight.stop_all()
        logging.warning("distill: stopping (%s); every reply that arrived is in %s; run the same command to ask "
                        "the rest", type(e).__name__, journal.path)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # in-flight tries were cut off: this is quick
        bar.close()
    return failed


def summarize(records: dict[str, dict], problems: list[dict], failed: int) -> dict[str, Any]:
    """kept / total with median kept-trace length in characters for this run's problems, overall and per
    source, and the traces file's kept count over every pass."""

    def block(done: list[dict], total: int) -> dict[str, Any]:
        kept = [r for r in done if r.get("correct")]
        return {"total": total, "graded": len(done), "kept": len(kept),
                "kept_fraction": len(kept) / total if total else 0.0,
                "median_chars": statistics.median(len(r["trace"]) for r in kept) if kept else 0}

    graded = [records[p["id"]] for p in problems if "correct" in records.get(p["id"], {})]
    summary = block(graded, len(problems))
    summary["failed_requests"] = failed
    summary["unanswered"] = sum("trace" not in records.get(p["id"], {}) for p in problems)
    sources = sorted({p["source"] for p in problems})
    summary["per_source"] = {s: block([r for r in graded if r["source"] == s],
                                      sum(p["source"] == s for p in problems)) for s in sources}
    all_kept = [r for r in records.values() if r.get("correct")]
    summary["traces_file"] = {"kept": len(all_kept), "per_source": {
        s: sum(r["source"] == s for r in all_kept) for s in sorted({r["source"] for r in all_kept})}}
    return summary


_TRACE_FIELDS = ("id", "source", "problem", "answer", "trace", "correct", "extracted", "finish_reason", "model")


def _write_traces(records: dict[str, dict], output: Path) -> None:
    """Every kept trace in the journal, whichever pass or source asked it; replaced atomically."""
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records.values():
            if record.get("correct"):
                f.write(json.dumps({k: record.get(k) for k in _TRACE_FIELDS}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(output)


def run_distill(cfg: DistillConfig, workdir: str | os.PathLike) -> dict[str, Any]:
    """Asks the teacher every problem without a reply yet, grades, writes the files; returns the summary
    (see the module docstring)."""
    proxy = proxy_for(chat_url(cfg.endpoint))  # a proxy setting that cannot work stops the run here
    output = Path(workdir) / cfg.output
    output.parent.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg)
    with Journal(output.with_name(output.name + ".attempts.jsonl")) as journal:
        records = merge_journal(read_rows(journal.path))
        # Replies that arrived in a run stopped before grading them.
        for record in records.values():
            if "trace" in record and "correct" not in record:
                journal.append(_grade(cfg, record))
        pending = [p for p in problems if "trace" not in records.get(p["id"], {})]
        logging.info("distill: %d problems, %d answered before, %d to ask %s%s", len(problems),
                     len(problems) - len(pending), len(pending), cfg.endpoint,
                     f" through the proxy {proxy.hostname}:{proxy.port or 80}" if proxy else "")
        failed = _ask_all(cfg, pending, journal)
        records = merge_journal(read_rows(journal.path))
        _write_traces(records, output)
    summary = summarize(records, problems, failed)
    summary.update(output=str(output), attempts=str(journal.path))
    with output.with_name(output.name + ".summary.json").open("w") as f:
        json.dump(summary, f, indent=2)
    logging.info("distill: kept %d of %d (median %s characters), %d requests failed; %s holds %d traces",
                 summary["kept"], summary["total"], summary["median_chars"], failed, output,
                 summary["traces_file"]["kept"])
    print(json.dumps(summary, indent=2))
    return summary
