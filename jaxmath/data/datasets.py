"""Problem sets as `Example(id, problem, answer, meta)`: from JSONL files on disk or from the HF hub.

The JSONL schema (one object per line: `id`, `problem`, `answer`, plus source-specific fields kept in
`meta`) is the one of the staged data folder; its PROVENANCE.md says how every file was built. The hub
loaders at the bottom map the public Hugging Face datasets onto the same `Example`s for users with
network access; `python -m jaxmath.data.datasets --out data` writes them as JSONL files that the file
loaders then read, so training and evaluation never need the network.

This module knows nothing of prompts, tokenizers or grading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file the user supplied is malformed (bad JSON, a missing field, a duplicate id): the
    message names the file, the line and what to fix; `jaxmath.main` prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem.

    id:      unique within its set, e.g. "test/precalculus/807.json" or "gsm8k_test_00000"
    problem: the problem statement (LaTeX allowed)
    answer:  the gold final answer as a string (never empty unless loaded with empty_answers="keep")
    meta:    every other field of the source row (level, subject, solution, ...), plus "source"
    """

    id: str
    problem: str
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


# name -> file in the data folder. "math_train*" are training sets; the rest are the study's Table 1
# benchmarks (olympiadbench = the 572 numerical problems the study reports; olympiadbench_all = 675).
FILES = {
    "math_train": "math_train.jsonl",
    "math_train_hard": "math_train_hard_l45.jsonl",
    "math500": "math500.jsonl",
    "gsm8k_train": "gsm8k_train.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "aime24": "aime2024.jsonl",
    "aime25": "aime2025.jsonl",
    "olympiadbench": "olympiadbench_numerical.jsonl",
    "olympiadbench_all": "olympiadbench_oe_to_maths_en_comp.jsonl",
}
BENCHMARKS = ("math500", "aime24", "aime25", "gsm8k", "olympiadbench", "olympiadbench_all")
TRAIN_SETS = ("math_train", "math_train_hard", "gsm8k_train")


def read_jsonl(path: str | os.PathLike, *, source: str, empty_answers: str = "error") -> list[Example]:
    """Reads one JSONL file of the shared schema.

    A row whose `answer` is missing or not a string is always an error. A row whose answer is empty
    is, by `empty_answers`: "error" (for benchmarks: an ungradable problem would silently change the
    denominator), "drop" (with a warning naming the ids; MATH train has two, from an empty `\\boxed{}`
    in the source solution) or "keep" (raw file counts).
    """
    if empty_answers not in ("error", "drop", "keep"):
        raise ValueError(f"empty_answers must be 'error', 'drop' or 'keep', got {empty_answers!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. The data folder must hold {sorted(set(FILES.values()))} in the jaxmath "
            "JSONL schema. Point data.dir at a folder that has them, or build one from the Hugging Face "
            f"hub with `python -m jaxmath.data.datasets --out {path.parent}` (needs `pip install datasets`)."
        )
    examples, dropped, seen = [], [], set()
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e}); each line must be one JSON object") from e
            for key in ("id", "problem"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise DataError(f"{where} has no string '{key}'; every row needs id, problem and answer")
            example_id = row["id"]
            if not isinstance(row.get("answer"), str):
                raise DataError(
                    f"{where} (id {example_id}) has no string 'answer'; fix the row or remove it from the file"
                )
            if example_id in seen:
                raise DataError(f"{where}: duplicate id {example_id}; ids must be unique within a file")
            seen.add(example_id)
            if not row["answer"].strip() and empty_answers != "keep":
                if empty_answers == "drop":
                    dropped.append(example_id)
                    continue
                raise DataError(
                    f"{where} (id {example_id}) has an empty answer, so it cannot be graded; "
                    "remove the row or give it an answer"
                )
            meta = {k: v for k, v in row.items() if k not in ("id", "problem", "answer")}
            meta["source"] = source
            examples.append(Example(example_id, row["problem"], row["answer"], meta))
    if dropped:
        log.warning("%s: dropped %d rows with an empty answer: %s", path.name, len(dropped), ", ".join(dropped))
    return examples


def load_math_train(data_dir: str | os.PathLike, *, hard_only: bool = False,
                    empty_answers: str = "drop") -> list[Example]:
    """MATH train: all levels (7,500 rows in the file) or levels 4-5 (3,994 rows, the study's count).

    The study's 3,994 is the raw count of the level 4-5 file. Two of its rows
    (train/number_theory/7115.json, 7117.json) have an empty answer and are dropped by default, which
    leaves 7,498 / 3,992 problems a reward can be computed for; `empty_answers="keep"` keeps them.
    """
    name = "math_train_hard" if hard_only else "math_train"
    return read_jsonl(Path(data_dir) / FILES[name], source=name, empty_answers=empty_answers)


def load(name: str, data_dir: str | os.PathLike, *, limit: int = 0) -> list[Example]:
    """Loads a benchmark or training set by name (see FILES); `limit` > 0 keeps the first `limit`."""
    if name not in FILES:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(FILES)}")
    if name in ("math_train", "math_train_hard"):
        examples = load_math_train(data_dir, hard_only=name == "math_train_hard")
    else:
        examples = read_jsonl(Path(data_dir) / FILES[name], source=name)
    return examples[:limit] if limit > 0 else examples


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> int:
    """Writes examples in the shared schema (meta flattened back into the row); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            meta = {k: v for k, v in ex.meta.items() if k != "source"}
            f.write(json.dumps({"id": ex.id, "problem": ex.problem, "answer": ex.answer, **meta},
                               ensure_ascii=False) + "\n")
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Hugging Face hub loaders. Each is a pure row mapper (unit-tested on hand-built rows) plus a thin
# `hub_*` function that downloads with `datasets`, which is imported lazily so it stays optional.
# ---------------------------------------------------------------------------------------------

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def _hub_rows(path: str, name: str | None, split: str) -> Iterable[dict]:
    try:
        import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            f"loading {path} from the Hugging Face hub needs the `datasets` package: `pip install datasets`; "
            "or point data.dir at a folder of JSONL files"
        ) from e
    return datasets.load_dataset(path, name, split=split)


def _level(raw: Any) -> int | None:
    match = re.search(r"\d+", str(raw))
    return int(match.group()) if match else None


def map_math500_row(row: dict, index: int) -> Example:
    """HuggingFaceH4/MATH-500 (test split): problem, solution, answer, subject, level, unique_id."""
    del index
    return Example(row["unique_id"], row["problem"], row["answer"],
                   {"level": _level(row["level"]), "subject": row["subject"], "solution": row["solution"],
                    "unique_id": row["unique_id"], "source": "math500"})


def map_hendrycks_math_row(row: dict, index: int, *, subject: str, split: str) -> Example:
    """EleutherAI/hendrycks_math (one config per subject): problem, level "Level N", type, solution.

    The hub copy has no answer field (taken as the last box of the solution, as for the JSONL files)
    and no file numbers, so ids are `<split>/<subject>/<row index>` and differ from the JSONL ids.
    The box is read by the reward's own extractor, so a gold answer is what the grader would extract.
    """
    from jaxmath.reward.extract import extract_boxed

    return Example(f"{split}/{subject}/{index}", row["problem"], extract_boxed(row["solution"]) or "",
                   {"level": _level(row["level"]), "level_raw": row["level"], "type": row["type"],
                    "subject_dir": subject, "solution": row["solution"], "source": "math_train"})


def map_gsm8k_row(row: dict, index: int, *, split: str) -> Example:
    """openai/gsm8k (config "main"): question, answer ending in "#### N" (commas dropped from N)."""
    if "####" not in row["answer"]:
        raise ValueError(f"gsm8k {split} row {index} has no '#### <answer>' line: {row['answer'][-80:]!r}")
    final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    return Example(f"gsm8k_{split}_{index:05d}", row["question"], final,
                   {"solution": row["answer"], "source": "gsm8k" if split == "test" else "gsm8k_train"})


def _aime_int(answer: Any) -> str:
    text = str(answer).strip()
    return str(int(text)) if text.isdigit() else text  # "025" -> "25", as in aime2024.jsonl


def map_aime2024_row(row: dict, index: int) -> Example:
    """HuggingFaceH4/aime_2024 (train split): id, problem, solution, answer, url, year.

    The id comes from the AoPS url (".../2024_AIME_I_Problems/Problem_1" -> "aime2024_I_01").
    """
    match = re.search(r"2024_AIME_(I{1,2})_Problems/Problem_(\d+)", row.get("url") or "")
    example_id = f"aime2024_{match.group(1)}_{int(match.group(2)):02d}" if match else f"aime2024_{index:02d}"
    return Example(example_id, row["problem"], _aime_int(row["answer"]),
                   {"answer_raw": str(row["answer"]), "solution": row.get("solution"), "url": row.get("url"),
                    "source": "aime24"})


def map_aime2025_row(row: dict, index: int) -> Example:
    """MathArena/aime_2025 (train split): problem_idx 1-30 (1-15 AIME I, 16-30 AIME II), problem, answer."""
    del index
    number = int(row["problem_idx"])
    exam, within = ("I", number) if number <= 15 else ("II", number - 15)
    return Example(f"aime2025_{exam}_{within:02d}", row["problem"], _aime_int(row["answer"]),
                   {"exam": f"AIME {exam}", "problem_number": within, "source": "aime25"})


def map_olympiadbench_row(row: dict, index: int) -> Example:
    """Hothan/OlympiadBench config OE_TO_maths_en_COMP: id, question, final_answer (1-element list), ...

    The hub copy has 674 rows, one fewer than the Qwen2.5-Math evaluation copy behind the JSONL files.
    """
    del index
    answers = row["final_answer"]
    if not answers:
        raise ValueError(f"OlympiadBench id {row['id']} has an empty final_answer")
    meta = {k: row.get(k) for k in ("subfield", "answer_type", "is_multiple_answer", "unit", "error", "solution")}
    return Example(f"olympiadbench_{row['id']}", row["question"], answers[0],
                   {**meta, "final_answer": list(answers), "source_id": row["id"], "source": "olympiadbench"})


def map_openr1_row(row: dict, index: int, *, max_trace_chars: int = 0) -> Example:
    """open-r1/OpenR1-Math-220k: keeps the DeepSeek-R1 generations that Math-Verify marked correct.

    meta["traces"] holds them (shorter than `max_trace_chars` when > 0: the study's length filter was
    4,000 characters); the SFT data builder turns each into one assistant turn.
    """
    flags = row.get("correctness_math_verify") or []
    traces = [g for g, ok in zip(row["generations"], flags) if ok]
    if max_trace_chars > 0:
        traces = [t for t in traces if len(t) < max_trace_chars]
    return Example(row.get("uuid") or f"openr1_{index}", row["problem"], row["answer"] or "",
                   {"traces": traces, "problem_type": row.get("problem_type"),
                    "question_type": row.get("question_type"), "data_source": row.get("source"),
                    "source": "openr1"})


def _map_all(rows: Iterable[dict], mapper: Callable[..., Example], keep_empty: bool = False,
             **kwargs) -> list[Example]:
    examples = [mapper(row, i, **kwargs) for i, row in enumerate(rows)]
    dropped = [ex.id for ex in examples if not ex.answer.strip()]
    if dropped and not keep_empty:
        log.warning("dropped %d hub rows with an empty answer: %s", len(dropped), ", ".join(dropped[:20]))
        examples = [ex for ex in examples if ex.answer.strip()]
    return examples


def hub_math500() -> list[Example]:
    return _map_all(_hub_rows("HuggingFaceH4/MATH-500", None, "test"), map_math500_row)


def hub_math_train(*, hard_only: bool = False, split: str = "train") -> list[Example]:
    """All 7 MATH subjects from EleutherAI/hendrycks_math; `hard_only` keeps levels 4-5."""
    examples = []
    for subject in MATH_SUBJECTS:
        examples += _map_all(_hub_rows("EleutherAI/hendrycks_math", subject, split), map_hendrycks_math_row,
                             subject=subject, split=split)
    return [ex for ex in examples if ex.meta["level"] in (4, 5)] if hard_only else examples


def hub_gsm8k(split: str = "test") -> list[Example]:
    return _map_all(_hub_rows("openai/gsm8k", "main", split), map_gsm8k_row, split=split)


def hub_aime24() -> list[Example]:
    return sorted(_map_all(_hub_rows("HuggingFaceH4/aime_2024", None, "train"), map_aime2024_row),
                  key=lambda ex: ex.id)


def hub_aime25() -> list[Example]:
    return _map_all(_hub_rows("MathArena/aime_2025", None, "train"), map_aime2025_row)


def hub_olympiadbench(*, numerical_only: bool = True) -> list[Example]:
    examples = _map_all(_hub_rows("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"), map_olympiadbench_row)
    return [ex for ex in examples if ex.meta["answer_type"] == "Numerical"] if numerical_only else examples


# The SFT sweep's OpenR1 file (Table 12, v3), beside the FILES; rows hold `problem` and `traces`
# (every DeepSeek-R1 generation Math-Verify marked correct), what jaxmath.sft.load_sft_examples reads.
OPENR1_FILE = "openr1.jsonl"


def write_openr1(rows: Iterable[dict], path: str | os.PathLike, *, max_trace_chars: int = 0) -> int:
    """OpenR1-Math-220k rows (the hub's schema: problem, answer, uuid, generations,
    correctness_math_verify, ...) as the SFT trace file `path`; problems without a verified trace are
    left out. Returns the rows written."""
    examples = [ex for ex in _map_all(rows, map_openr1_row, max_trace_chars=max_trace_chars) if ex.meta["traces"]]
    return write_jsonl(examples, path)


def download_all(out_dir: str | os.PathLike, *, openr1: bool = True) -> dict[str, int]:
    """Writes every FILES entry from the hub into `out_dir`, and with `openr1` the SFT sweep's
    OPENR1_FILE (OpenR1-Math-220k's default config, 94k problems, about 5 GB to download); returns
    rows written per file."""
    builders = {
        "math_train": lambda: hub_math_train(),
        "math_train_hard": lambda: hub_math_train(hard_only=True),
        "math500": hub_math500,
        "gsm8k_train": lambda: hub_gsm8k("train"),
        "gsm8k": lambda: hub_gsm8k("test"),
        "aime24": hub_aime24,
        "aime25": hub_aime25,
        "olympiadbench": hub_olympiadbench,
        "olympiadbench_all": lambda: hub_olympiadbench(numerical_only=False),
    }
    written = {FILES[name]: write_jsonl(build(), Path(out_dir) / FILES[name]) for name, build in builders.items()}
    if openr1:
        written[OPENR1_FILE] = write_openr1(_hub_rows("open-r1/OpenR1-Math-220k", "default", "train"),
                                            Path(out_dir) / OPENR1_FILE)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the JSONL data folder from the Hugging Face hub.")
    parser.add_argument("--out", default="data", help="folder to write the JSONL files into")
    parser.add_argument("--skip_openr1", action="store_true",
                        help=f"do not write {OPENR1_FILE} (only the SFT sweep's v3 row reads it; ~5 GB download)")
    logging.basicConfig(level=logging.INFO)
    args = parser.parse_args()
    for file_name, rows in download_all(args.out, openr1=not args.skip_openr1).items():
        print(f"{file_name}: {rows} rows")
