"""Resource requests as values: equality, hashing, and crossing processes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

from asyncflow.resources import Request


def test_equal_requests_hash_alike_and_the_hash_is_kept() -> None:
    a = Request(cpus=2, memory=1000, custom={"licence": 1})
    b = Request(cpus=2, memory=1000, custom={"licence": 1})
    assert a == b
    assert hash(a) == hash(b) == hash(a)
    assert {a: "x"}[b] == "x"
    assert Request(cpus=2) != a


def test_a_pickled_request_hashes_as_one_made_in_the_other_process() -> None:
    """The cached hash is not carried: string hashes differ per process."""
    request = Request(cpus=1, gpus=1, custom={"licence": 2})
    hash(request)  # cached here
    code = (
        "import pickle, sys\n"
        "from asyncflow.resources import Request\n"
        "got = pickle.loads(sys.stdin.buffer.read())\n"
        "fresh = Request(cpus=1, gpus=1, custom={'licence': 2})\n"
        "print(hash(got) == hash(fresh), got == fresh, {fresh: 1}.get(got))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(request),
        capture_output=True,
        env=env,
        check=True,
    ).stdout.decode()
    assert out.split() == ["True", "True", "1"]
