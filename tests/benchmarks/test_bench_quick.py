"""The benchmark suite must keep running: its quick mode, run as CI does.

These tests check that every workload runs on our library and that the
results are well formed. They never check how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "run.py"
WORKLOADS = {"W1", "W2", "W3", "W4", "W5", "W6"}


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "W1" in done.stdout  # the table was printed
    return json.loads(out.read_text())


def test_quick_covers_every_workload(quick_report: dict[str, Any]) -> None:
    assert quick_report["mode"] == "quick"
    assert {c["workload"] for c in quick_report["cases"]} == WORKLOADS
    groups = {c["group"] for c in quick_report["cases"]}
    assert {"W2 threads", "W2 asyncio", "W2 dry-run", "W4 100k", "W4 1M"} <= groups
    assert {c["system"] for c in quick_report["cases"]} == {"asyncflow"}


def test_quick_runs_are_well_formed(quick_report: dict[str, Any]) -> None:
    for case in quick_report["cases"]:
        assert case["reps"] == case["ok_reps"] >= 1, case["runs"]
        assert case["metric"] in {"tasks/s", "µs/hop"}
        for key in ("value", "wall_s", "peak_rss_mb"):
            spread = case[key]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (key, case)
        for run in case["runs"]:
            assert run["ok"] is True
            assert run["exit_code"] == 0
            assert run["tasks"] >= run["size"] // 2 > 0
            assert run["wall_s"] > 0
            assert run["peak_rss_mb"] > 0
            assert run["parent_maxrss_mb"] > 0
        assert "ratio_ours_over_this" in case


def test_quick_records_the_machine(quick_report: dict[str, Any]) -> None:
    machine = quick_report["machine"]
    assert machine["cores"] >= 1
    assert machine["python"].split()[-1] == sys.version.split()[0]
    assert "asyncflow-workflows" in machine["packages"]
    assert quick_report["source"]["src_sha256"]


def test_only_filters_and_rejects_unknown_workloads(tmp_path: Path) -> None:
    out = tmp_path / "only.json"
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "w2", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert {c["workload"] for c in report["cases"]} == {"W2"}

    bad = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "W9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert bad.returncode == 2
    assert "W9" in bad.stderr


def test_targets_and_markdown_from_synthetic_results(tmp_path: Path) -> None:
    """Every target is evaluated and RESULTS.md is written for a full report."""
    runner = _load_runner()

    def fake_run(group: Any, case: Any) -> dict[str, Any]:
        ours = case.system == "asyncflow"
        wall = 0.01 if ours else 1.0
        return {
            "ok": True,
            "size": case.size,
            "tasks": case.size,
            "wall_s": wall,
            "peak_rss_mb": 100.0,
            "rss_before_mb": 50.0 if ours else 10.0,
            "exit_code": 0,
        }

    cases = [
        runner.summarize(group, case, [fake_run(group, case)])
        for group in runner.GROUPS
        for case in group.cases
    ]
    runner.add_ratios(cases)
    targets = runner.evaluate_targets(cases, WORKLOADS)
    assert {t["workload"] for t in targets} == WORKLOADS
    assert all(t["met"] in (True, False) for t in targets)
    verdicts = {t["target"]: t["met"] for t in targets}
    assert verdicts["W1 throughput >= 2x Parsl"] is True
    assert verdicts["W4 1M: >= 50,000 tasks/s"] is True
    assert verdicts["W5: all 10,000 finish within 0.5 s wall"] is True

    machine = {
        "cpu_model": "test CPU",
        "cores": 2,
        "memory_gib": 1.0,
        "os": "test OS",
        "python": "CPython 3.x",
        "packages": {"asyncflow": "0"},
        "load_average_at_start": (0.0, 0.0, 0.0),
        "load_average_at_end": (0.0, 0.0, 0.0),
    }
    report = {
        "created": "now",
        "elapsed_s": 60.0,
        "reps": 1,
        "machine": machine,
        "cases": cases,
        "targets": targets,
    }
    path = tmp_path / "RESULTS.md"
    runner.write_markdown(path, report)
    text = path.read_text()
    assert "test CPU" in text
    assert "## Targets" in text
    assert text.count("| met |") + text.count("**not met**") == len(targets)


@pytest.mark.parametrize("bodies", [[], ["--async"]])
def test_loop_cost_reports_every_configuration(bodies: list[str]) -> None:
    """``loop_cost.py`` runs and prints a line per configuration (its
    figures are never checked: they measure the machine)."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "loop_cost.py"),
            "--tasks",
            "100",
            "--runs",
            "1",
            *bodies,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"W1, 100 no-op {'async' if bodies else 'def'} tasks")
    assert [line.split()[0] for line in lines[1:]] == [
        "plain",
        "null",
        "trace",
        "progress",
    ]
    assert all("µs/task" in line for line in lines[1:])
