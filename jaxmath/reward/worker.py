"""Entry point of a grading worker process: `python -m jaxmath.reward.worker`.

Reads length-prefixed pickled requests on stdin and writes pickled replies on stdout. The parent
(`pool.py`) is the only peer; it kills this process when a request runs past its time bound, which is
the one interruption that works while sympy is inside a long big-integer computation.

Requests:
    ("symbolic", [(pred, gold), ...])  -> bool: any pair equal on the symbolic path
    ("grade", pred_text, gold_text)    -> bool: a whole in-process grading (used by grade_batch)
"""

from __future__ import annotations

import os
import pickle
import struct
import sys


def _read_exactly(stream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(stdin, stdout) -> None:
    """Answers requests until stdin closes."""
    import importlib

    # `jaxmath.reward.grade` the function shadows the module of the same name on the package.
    grading = importlib.import_module("jaxmath.reward.grade")
    importlib.import_module("jaxmath.reward.symbolic")  # import cost paid before "ready"

    def send(obj) -> None:
        payload = pickle.dumps(obj)
        stdout.write(struct.pack("<Q", len(payload)) + payload)
        stdout.flush()

    send("ready")
    while True:
        header = _read_exactly(stdin, 8)
        if header is None:
            return
        request = pickle.loads(_read_exactly(stdin, struct.unpack("<Q", header)[0]))
        try:
            if request[0] == "symbolic":
                reply = grading.symbolic_verdict_local(request[1])
            elif request[0] == "grade":
                reply = grading.grade_local(request[1], request[2])
            elif request[0] == "crash":
                # Used by tests to check that a batch survives a worker dying mid-request.
                os._exit(3)
            else:
                reply = False
        except Exception:
            reply = False
        send(reply)


if __name__ == "__main__":
    # The request stream is binary; stdout must not be used for anything else.
    binary_out = sys.stdout.buffer
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, binary_out)
