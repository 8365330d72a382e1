"""Teacher traces for SFT through any OpenAI-compatible chat endpoint, graded, filtered, resumable.

    python -m jaxmath.main --config=configs/distill.py --config.distill.endpoint=http://HOST:8000/v1

The study served Qwen3-235B-A22B-Instruct-2507 with vLLM, asked it every MATH level 4-5 problem
and 500 OlympiadBench numerical problems, and kept the 3,825 answers graded correct. Here each
problem is sent as the same user turn evaluation uses (`jaxmath.data.prompts.user_turn`: the
problem, then the \\boxed{} instruction); the reply is graded like the RL reward (last \\boxed{}
against the gold answer with `jaxmath.reward`).

Files (in the run directory unless `output` is absolute):
    <output>                 correct traces only, one per problem: {id, source, problem, answer, trace,
                             correct, extracted, finish_reason, model}; what `sft.train_files` reads
    <output>.attempts.jsonl  every graded reply, appended as it arrives; the record of what is done
    <output>.summary.json    kept / total, median trace length in characters, per source

Resume: ids in the attempts file are skipped, so a rerun after a crash or kill sends only the
problems without a graded reply; the traces file is rewritten from the attempts file at the end
(never appended), so it cannot hold duplicates. A request is retried on connection errors,
timeouts, HTTP 408/429/5xx and malformed replies, with exponential backoff; a problem whose retries
run out is left out of the attempts file (counted as failed) and is asked again on the next run.

Only the standard library talks HTTP (urllib, a thread pool), so nothing beyond jaxmath is needed
on the machine that runs this.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from absl import logging

RETRY_STATUS = (408, 429, 500, 502, 503, 504)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """endpoint:     base URL of an OpenAI-compatible server ("http://host:8000/v1"; a full
                     ".../chat/completions" URL is used as is)
    model:           the served model name sent in each request
    api_key_env:     environment variable holding the API key ("" or unset: no Authorization header)
    sources:         data set names of jaxmath.data.datasets.FILES under data_dir, or .jsonl paths
    limit:           > 0: the first `limit` problems of each source
    concurrency:     requests in flight
    max_retries:     retries per request after the first try; backoff_seconds doubles each time
                     (capped at 60 s, with +-50% jitter so clients do not retry in lockstep)
    timeout:         seconds per HTTP request
    temperature, top_p, max_tokens: sampling; the study does not state them
    output:          the traces file; relative paths are under the run directory
    system_prompt:   optional system turn; instruction is appended to each problem
    grade_timeout:   seconds per answer comparison
    """

    endpoint: str
    model: str = "Qwen/Qwen3-235B-A22B-Instruct-2507"
    api_key_env: str = "OPENAI_API_KEY"
    sources: tuple[str, ...] = ("math_train_hard", "olympiadbench")
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
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError("distill.concurrency must be >= 1 and distill.max_retries >= 0")


class RequestFailed(RuntimeError):
    """A request that did not succeed within its retries (or failed in a way retrying cannot fix)."""


def chat_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def load_problems(cfg: DistillConfig) -> list[dict[str, str]]:
    """[{id, source, problem, answer}] over all sources; ids are prefixed by source to stay unique."""
    from jaxmath.data import datasets

    problems = []
    for source in cfg.sources:
        if source.endswith(".jsonl"):
            name = Path(source).stem
            examples = datasets.read_jsonl(source, source=name, empty_answers="drop")
            examples = examples[:cfg.limit] if cfg.limit else examples
        else:
            name = source
            examples = datasets.load(source, cfg.data_dir, limit=cfg.limit)
        problems += [{"id": f"{name}/{ex.id}", "source": name, "problem": ex.problem, "answer": ex.answer}
                     for ex in examples]
    return problems


def messages_for(problem: str, system_prompt: str = "") -> list[dict[str, str]]:
    from jaxmath.data.prompts import user_turn

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": user_turn(problem)}]


def request_completion(cfg: DistillConfig, messages: list[dict[str, str]], *, sleep=time.sleep) -> dict[str, Any]:
    """One chat completion with retries: returns {"text", "finish_reason"}; raises RequestFailed."""
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                       "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = chat_url(cfg.endpoint)
    last_error = ""
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            delay = min(60.0, cfg.backoff_seconds * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            sleep(delay)
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
                reply = json.loads(response.read())
            choice = reply["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise ValueError(f"message.content is {type(text).__name__}, not text")
            return {"text": text, "finish_reason": choice.get("finish_reason")}
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code not in RETRY_STATUS:
                raise RequestFailed(f"{url} answered HTTP {e.code}: {detail}; check distill.endpoint, "
                                    f"distill.model and the key in ${cfg.api_key_env}") from e
            last_error = f"HTTP {e.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last_error = f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, or not a chat completion
            last_error = f"malformed reply ({type(e).__name__}: {e})"
        logging.warning("distill: request failed (try %d of %d): %s", attempt + 1, cfg.max_retries + 1, last_error)
    raise RequestFailed(f"{url}: no answer after {cfg.max_retries + 1} tries; last error {last_error}")


def read_rows(path: Path) -> list[dict]:
    """JSONL rows, skipping a torn last line left by a killed writer."""
    rows = []
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    logging.warning("distill: %s has a torn line (killed mid-write?); ignoring it", path)
    return rows


def summarize(rows: list[dict], problems: list[dict], failed: int) -> dict[str, Any]:
    """kept / total with median kept-trace length in characters, overall and per source."""

    def block(done: list[dict], total: int) -> dict[str, Any]:
        kept = [r for r in done if r["correct"]]
        return {"total": total, "graded": len(done), "kept": len(kept),
                "kept_fraction": len(kept) / total if total else 0.0,
                "median_chars": statistics.median(len(r["trace"]) for r in kept) if kept else 0}

    wanted = {p["id"] for p in problems}
    rows = [r for r in rows if r["id"] in wanted]
    summary = block(rows, len(problems))
    summary["failed_requests"] = failed
    sources = sorted({p["source"] for p in problems})
    summary["per_source"] = {s: block([r for r in rows if r["source"] == s],
                                      sum(p["source"] == s for p in problems)) for s in sources}
    return summary


def run_distill(cfg: DistillConfig, workdir: str | os.PathLike) -> dict[str, Any]:
    """Asks the teacher every problem without a graded reply yet, grades, writes the files; returns the
    summary (see the module docstring)."""
    from jaxmath.metrics import progress
    from jaxmath.reward import extract_boxed, grade

    output = Path(workdir) / cfg.output
    output.parent.mkdir(parents=True, exist_ok=True)
    attempts_path = output.with_name(output.name + ".attempts.jsonl")
    problems = load_problems(cfg)
    done = {r["id"] for r in read_rows(attempts_path)}
    pending = [p for p in problems if p["id"] not in done]
    logging.info("distill: %d problems, %d already graded, %d to ask %s", len(problems), len(problems) - len(pending),
                 len(pending), cfg.endpoint)
    failed = 0
    # A torn last line must not glue onto the next row: start appending on a fresh line.
    if attempts_path.is_file() and attempts_path.stat().st_size:
        with attempts_path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
        if needs_newline:
            with attempts_path.open("a") as f:
                f.write("\n")
    with attempts_path.open("a", encoding="utf-8") as out, \
            concurrent.futures.ThreadPoolExecutor(cfg.concurrency) as pool:
        futures = {pool.submit(request_completion, cfg, messages_for(p["problem"], cfg.system_prompt)): p
                   for p in pending}
        bar = progress(len(futures), desc="distill")
        for future in concurrent.futures.as_completed(futures):
            problem = futures[future]
            bar.update(1)
            try:
                reply = future.result()
            except RequestFailed as e:
                failed += 1
                logging.warning("distill: %s left for the next run: %s", problem["id"], e)
                continue
            extracted = extract_boxed(reply["text"])
            correct = extracted is not None and grade(extracted, problem["answer"], timeout=cfg.grade_timeout)
            row = {**problem, "trace": reply["text"], "correct": bool(correct), "extracted": extracted,
                   "finish_reason": reply["finish_reason"], "model": cfg.model}
            # One line per write, flushed, so a kill loses at most the reply being written.
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
        bar.close()

    rows = list({r["id"]: r for r in read_rows(attempts_path)}.values())
    wanted = {p["id"] for p in problems}
    kept = [r for r in rows if r["correct"] and r["id"] in wanted]
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(output)
    summary = summarize(rows, problems, failed)
    summary.update(output=str(output), attempts=str(attempts_path))
    with output.with_name(output.name + ".summary.json").open("w") as f:
        json.dump(summary, f, indent=2)
    logging.info("distill: kept %d of %d (median %s characters), %d requests failed; %s", summary["kept"],
                 summary["total"], summary["median_chars"], failed, output)
    print(json.dumps(summary, indent=2))
    return summary
