"""Every script in examples/ runs, exits 0 and prints what it is about.

Each example runs as a separate program, from a temporary directory, with
this interpreter. The expected lines are results the example computes, so a
behaviour change that breaks an example's point fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))

#: A hung example fails the test instead of hanging the suite.
TIMEOUT = 60.0

#: One line (or part of a line) each example must print.
EXPECTED = {
    "01_hello.py": "HELLO, ASYNCFLOW!",
    "02_fan_out_fan_in.py": "primes below 50000: 5133",
    "03_executables.py": "sum of 1..100 computed by awk: 5050",
    "04_blocks.py": "study: CANCELLED; members: ['CANCELLED', 'CANCELLED', 'CANCELLED']",
    "05_failures.py": "outcomes: CANCELLED=1, DONE=2, FAILED=2",
    "06_process_pool.py": "longest Collatz chain below 100000 starts at 77031",
}


def test_every_example_has_an_expectation() -> None:
    assert sorted(EXPECTED) == [path.name for path in EXAMPLES]


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    report = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report
    assert EXPECTED[example.name] in done.stdout, report
