"""Sequence packing: documents placed first-fit into rows of `max_seq_len` positions.

Every document keeps its own segment id (1, 2, ...; 0 is padding) and positions restarting at 0, and
the model's attention never crosses segments, so a packed row computes exactly what separate rows
would. Inputs and targets are shifted per document before packing, so no target crosses a boundary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxmath.data.chat import TokenizedExample

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


def truncate(example: TokenizedExample, max_seq_len: int) -> TokenizedExample | None:
    """Cuts a document to the max_seq_len + 1 tokens that fill one row (inputs are all but the last,
    targets all but the first); None when no loss token is left."""
    ids, mask = example.input_ids[:max_seq_len + 1], example.loss_mask[:max_seq_len + 1]
    if len(ids) < 2 or not any(mask[1:]):
        return None
    return TokenizedExample(list(ids), list(mask))


def pack_plan(lengths: Sequence[int], max_seq_len: int, pack: bool = True) -> list[list[int]]:
    """Which documents go in which row, in the given order: first fit of `lengths` (positions each
    document needs, i.e. tokens - 1) into rows of max_seq_len; one document per row when not pack."""
    if any(n > max_seq_len or n < 1 for n in lengths):
        raise ValueError(f"every document must need 1..{max_seq_len} positions; truncate() them first")
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        # Linear first fit is O(docs * rows): fine for the study's thousands of traces.
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_seq_len - n)
    return rows


def pack_examples(examples: Sequence[TokenizedExample], max_seq_len: int,
                  rows: Sequence[Sequence[int]] | None = None, num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Materializes rows of documents as arrays, each [num_rows, max_seq_len]:

    input_ids   int32  tokens 0..n-2 of each document
    targets     int32  tokens 1..n-1 (the next token at each position)
    segment_ids int32  1, 2, ... per document within a row; 0 for padding
    positions   int32  restarting at 0 in each document
    loss_mask   bool   True where the target is an assistant token

    rows: document indices per row (default: first-fit `pack_plan` of all examples); num_rows pads
    with empty rows (all padding) to a fixed batch size.
    """
    if rows is None:
        rows = pack_plan([len(e.input_ids) - 1 for e in examples], max_seq_len)
    n = len(rows) if num_rows is None else num_rows
    if n < len(rows):
        raise ValueError(f"num_rows {num_rows} is smaller than the {len(rows)} rows given")
    out = {k: np.zeros((n, max_seq_len), np.int32) for k in BATCH_KEYS[:-1]}
    out["loss_mask"] = np.zeros((n, max_seq_len), bool)
    for r, docs in enumerate(rows):
        at = 0
        for seg, i in enumerate(docs, start=1):
            ids, mask = examples[i].input_ids, examples[i].loss_mask
            k = len(ids) - 1
            if at + k > max_seq_len:
                raise ValueError(f"row {r} overflows max_seq_len {max_seq_len}; build rows with pack_plan")
            out["input_ids"][r, at:at + k] = ids[:-1]
            out["targets"][r, at:at + k] = ids[1:]
            out["segment_ids"][r, at:at + k] = seg
            out["positions"][r, at:at + k] = np.arange(k)
            out["loss_mask"][r, at:at + k] = mask[1:]
            at += k
    return out
