"""``import asyncflow`` and a default engine load no optional extra.

Optional dependencies (Dask, rich, matplotlib, OpenTelemetry, httpx,
RHAPSODY) and the heavy modules only some features need (cloudpickle and
multiprocessing for process pools, sqlite3 for checkpoints, and our own
modules behind those features) load on first use. Each check runs in a
fresh interpreter, so that nothing this test session imported counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: Packages of the optional extras, and the heavy modules only process pools
#: (cloudpickle, multiprocessing) and checkpoints (sqlite3) need.
OPTIONAL = (
    "cloudpickle",
    "concurrent.futures.process",
    "dask",
    "distributed",
    "httpx",
    "matplotlib",
    "multiprocessing",
    "openai",
    "opentelemetry",
    "rhapsody",
    "rich",
    "sqlite3",
)
#: Our modules behind features that must be asked for.
OWN_LAZY = (
    "asyncflow.backends.dask_",
    "asyncflow.backends.prompt",
    "asyncflow.backends.rhapsody",
    "asyncflow.checkpoint",
    "asyncflow.files",
    "asyncflow.graph",
    "asyncflow.observers.otel",
    "asyncflow.observers.progress",
    "asyncflow.observers.trace",
    "asyncflow.report",
)


def _run(code: str, cwd: Path) -> object:
    """Run ``code`` in a fresh interpreter; return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _heavy(loaded: object) -> list[str]:
    assert isinstance(loaded, list)
    assert "asyncflow" in loaded  # the probe really imported the package
    return sorted(
        name
        for name in loaded
        if name in OWN_LAZY or name.split(".")[0] in OPTIONAL or name in OPTIONAL
    )


def test_import_loads_no_optional_module(tmp_path: Path) -> None:
    loaded = _run(
        """
        import json, sys
        import asyncflow
        print(json.dumps(sorted(sys.modules)))
        """,
        tmp_path,
    )
    assert _heavy(loaded) == []


def test_default_engines_load_no_optional_module(tmp_path: Path) -> None:
    """A default engine (threads) and a dry run, each running tasks of both
    kinds of body, and shut down."""
    loaded = _run(
        """
        import asyncio, json, sys
        from asyncflow import WorkflowEngine

        async def main():
            for dry_run in (False, True):
                async with await WorkflowEngine.create(dry_run=dry_run) as flow:
                    @flow.function_task
                    def plain(x):
                        return x + 1

                    @flow.function_task
                    async def coro(x):
                        return x * 2

                    results = await asyncio.gather(coro(plain(1)), plain(2))
                    if not dry_run:
                        assert results == [4, 3], results
            assert flow.is_shut_down

        asyncio.run(main())
        print(json.dumps(sorted(sys.modules)))
        """,
        tmp_path,
    )
    assert _heavy(loaded) == []


def test_features_still_load_what_they_need(tmp_path: Path) -> None:
    """The lazy imports are real: a checkpoint and a trace load their modules
    (so the checks above would see them), and both still work."""
    loaded = _run(
        """
        import asyncio, json, sys
        from asyncflow import WorkflowEngine

        async def main():
            async with await WorkflowEngine.create(
                checkpoint="run.db", trace="trace.jsonl"
            ) as flow:
                @flow.function_task
                def one():
                    return 1

                assert await one() == 1

        asyncio.run(main())
        print(json.dumps(sorted(sys.modules)))
        """,
        tmp_path,
    )
    heavy = _heavy(loaded)
    assert {"asyncflow.checkpoint", "asyncflow.observers.trace", "sqlite3"} <= set(
        heavy
    )
    assert (tmp_path / "run.db").stat().st_size > 0
    assert (tmp_path / "trace.jsonl").read_text().strip()


def test_lazy_public_names_resolve(tmp_path: Path) -> None:
    """Every name of ``asyncflow.__all__`` and ``asyncflow.backends.__all__``
    resolves, lazy ones to the object of the module that defines them."""
    resolved = _run(
        """
        import importlib, json
        import asyncflow, asyncflow.backends

        out = {}
        for package in (asyncflow, asyncflow.backends):
            lazy = package._LAZY
            for name in package.__all__:
                value = getattr(package, name)
                if name in lazy:
                    home = importlib.import_module(lazy[name])
                    assert getattr(home, name) is value, name
                out[f"{package.__name__}.{name}"] = name in lazy
        namespace = {}
        exec("from asyncflow import *", namespace)
        exec("from asyncflow.backends import *", namespace)
        public = set(asyncflow.__all__) | set(asyncflow.backends.__all__)
        out["star"] = sorted(public - set(namespace))
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert isinstance(resolved, dict)
    assert resolved.pop("star") == []
    import asyncflow
    import asyncflow.backends

    expected = {f"asyncflow.{n}" for n in asyncflow.__all__} | {
        f"asyncflow.backends.{n}" for n in asyncflow.backends.__all__
    }
    assert set(resolved) == expected
    assert resolved["asyncflow.RhapsodyBackend"] is True
    assert resolved["asyncflow.backends.RhapsodyBackend"] is True
    assert resolved["asyncflow.WorkflowEngine"] is False


@pytest.mark.parametrize("package", ["asyncflow", "asyncflow.backends"])
def test_unknown_names_still_raise(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
