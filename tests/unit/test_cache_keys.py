"""Cache keys identify the computation: its code, what it reads, its arguments.

Keys across interpreters are compared by running child processes with other
hash seeds and other copies of a workflow's source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncflow.checkpoint import CheckpointStore, Uncacheable, task_key
from asyncflow.tasks import TaskDefinition, TaskFuture, TaskKind, TaskOptions

# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def call(
    loop: asyncio.AbstractEventLoop,
    function: Callable[..., Any],
    *args: Any,
    kind: TaskKind = TaskKind.FUNCTION,
    options: TaskOptions | None = None,
    command: Any = None,
    description: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TaskFuture:
    """A task call as the engine records it once its arguments are resolved."""
    definition = TaskDefinition(
        function, kind, description or {}, None, options or TaskOptions()
    )
    task = TaskFuture(loop=loop)
    task._definition = definition
    task._description = dict(definition.description)
    task._command = command
    task.name = definition.name
    task.uid = "task.000000"
    task.args = args
    task.kwargs = kwargs
    return task


def key(
    loop: asyncio.AbstractEventLoop,
    function: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> str:
    return task_key(call(loop, function, *args, **kwargs))


# -- within one interpreter ------------------------------------------------------------


def test_closures_over_different_values_have_different_keys(loop) -> None:
    def scaled(factor: int) -> Callable[[int], int]:
        def scale(x: int) -> int:
            return x * factor

        return scale

    assert key(loop, scaled(2), 10) != key(loop, scaled(3), 10)
    assert key(loop, scaled(2), 10) == key(loop, scaled(2), 10)


def test_two_lambdas_on_one_line_have_different_keys(loop) -> None:
    one, two = (lambda: 1), (lambda: 2)
    add, mul = (lambda x: x + 2), (lambda x: x * 2)
    assert key(loop, one) != key(loop, two)
    assert key(loop, add, 3) != key(loop, mul, 3)


def test_defaults_and_keyword_defaults_are_part_of_the_key(loop) -> None:
    def make(offset: int) -> tuple[Callable[..., int], Callable[..., int]]:
        def positional(x: int, y: int = offset) -> int:
            return x + y

        def keyword(x: int, *, y: int = offset) -> int:
            return x + y

        return positional, keyword

    (p1, k1), (p2, k2) = make(1), make(2)
    assert key(loop, p1, 0) != key(loop, p2, 0)
    assert key(loop, k1, 0) != key(loop, k2, 0)


def test_a_helper_the_body_calls_is_part_of_the_key(loop) -> None:
    keys = []
    for step in (1, 2):
        namespace: dict[str, Any] = {}
        source = f"def helper(x):\n    return x + {step}\n"
        exec(source + "def task(x):\n    return helper(x)\n", namespace)
        keys.append(key(loop, namespace["task"], 1))
    assert keys[0] != keys[1]


def test_recursive_helpers_and_self_reference_terminate(loop) -> None:
    namespace: dict[str, Any] = {}
    exec(
        "def even(n):\n    return n == 0 or odd(n - 1)\n"
        "def odd(n):\n    return n != 0 and even(n - 1)\n",
        namespace,
    )
    assert key(loop, namespace["even"], 4) == key(loop, namespace["even"], 4)


def test_mutable_captured_state_is_keyed_by_type_so_a_run_cannot_shift_it(loop) -> None:
    """A list the tasks fill as they run must not change later calls' keys."""
    ran: list[str] = []

    def work(x: int) -> int:
        ran.append("work")
        return x

    before = key(loop, work, 1)
    ran.extend(["a", "b"])
    assert key(loop, work, 1) == before


def test_arguments_are_encoded_independently_of_insertion_order(loop) -> None:
    def task(*args: Any) -> None:
        return None

    @dataclasses.dataclass
    class Record:
        labels: set[str]
        extra: dict[str, Any]

    class Plain:
        def __init__(self, order: list[str]) -> None:
            for name in order:
                setattr(self, name, {name: frozenset(order)})

    names = [f"name-{i}" for i in range(20)]
    forward = dict.fromkeys(names, 1)
    backward = dict.fromkeys(reversed(names), 1)
    assert list(forward) != list(backward)
    assert key(loop, task, forward) == key(loop, task, backward)
    assert key(loop, task, [(forward, {1, 2})]) == key(loop, task, [(backward, {2, 1})])
    assert key(loop, task, Record(set(names), forward)) == key(
        loop, task, Record(set(reversed(names)), backward)
    )
    assert key(loop, task, Plain(names)) == key(loop, task, Plain(names[::-1]))
    assert key(loop, task, Record({"a"}, {})) != key(loop, task, Record({"b"}, {}))


def test_values_of_different_types_or_shapes_do_not_collide(loop) -> None:
    def task(*args: Any, **kwargs: Any) -> None:
        return None

    class Color(enum.Enum):
        RED = 1
        GREEN = 2

    calls = [
        ((1,), {}),
        ((1.0,), {}),
        ((True,), {}),
        (("1",), {}),
        ((b"1",), {}),
        (([1],), {}),
        (((1,),), {}),
        (({1},), {}),
        ((frozenset({1}),), {}),
        (({"1": 1},), {}),
        (((), ()), {}),
        (([[]],), {}),
        (([], []), {}),
        ((), {"x": 1}),
        ((Color.RED,), {}),
        ((Color.GREEN,), {}),
        ((Path("a"),), {}),
        ((10**5000,), {}),
        ((-(10**5000),), {}),
    ]
    keys = {key(loop, task, *args, **kwargs) for args, kwargs in calls}
    assert len(keys) == len(calls)


def test_an_argument_nested_too_deep_or_cyclic_is_uncacheable(loop) -> None:
    def task(value: Any) -> None:
        return None

    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    nested_dict: dict[str, Any] = {}
    for _ in range(10_000):
        nested_dict = {"x": nested_dict}
    for value in (deep, cyclic, nested_dict):
        with pytest.raises(Uncacheable, match="nested more than"):
            key(loop, task, value)


def test_an_argument_with_no_stable_encoding_is_uncacheable(loop) -> None:
    def task(value: Any) -> None:
        return None

    with pytest.raises(Uncacheable, match="lock"):
        key(loop, task, threading.Lock())


def test_key_for_never_raises_and_warns_once_per_task(
    loop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def task(value: Any) -> None:
        return None

    def failing_key(value: Any) -> Any:
        raise ValueError("no key for you")

    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    store = CheckpointStore(tmp_path / "run.db")
    try:
        with caplog.at_level(logging.WARNING, logger="asyncflow"):
            assert store.key_for(call(loop, task, deep)) is None
            assert store.key_for(call(loop, task, deep)) is None
            with_key = TaskOptions(cache_key=failing_key)
            assert store.key_for(call(loop, failing_key, 1, options=with_key)) is None
    finally:
        store.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'task' has no stable cache key" in m for m in messages) == 1
    assert any("no key for you" in m for m in messages)


def test_cache_key_replaces_the_arguments(loop) -> None:
    def fetch(url: str, session: object) -> None:
        return None

    options = TaskOptions(cache_key=lambda url, session: url)
    a = task_key(call(loop, fetch, "https://a", object(), options=options))
    b = task_key(call(loop, fetch, "https://a", object(), options=options))
    c = task_key(call(loop, fetch, "https://c", object(), options=options))
    assert a == b != c


def test_version_replaces_the_code(loop) -> None:
    namespace: dict[str, Any] = {}
    exec("def solve(x):\n    return x\n", namespace)
    first = namespace["solve"]
    exec("def solve(x):\n    return x * 2\n", namespace)
    second = namespace["solve"]
    v1 = TaskOptions(version="1")
    assert task_key(call(loop, first, 1, options=v1)) == task_key(
        call(loop, second, 1, options=v1)
    )
    assert task_key(call(loop, first, 1, options=v1)) != task_key(
        call(loop, first, 1, options=TaskOptions(version="2"))
    )
    assert task_key(call(loop, first, 1)) != task_key(call(loop, second, 1))


def test_executable_keys_cover_the_command_and_how_it_runs(loop) -> None:
    async def run() -> str:
        return "ignored"

    def executable(command: Any, **description: Any) -> str:
        return task_key(
            call(
                loop,
                run,
                kind=TaskKind.EXECUTABLE,
                command=command,
                description=description,
            )
        )

    keys = [
        executable("echo a b"),
        executable(["echo", "a b"]),
        executable(["echo", "a", "b"]),
        executable("echo a b", shell=True),
        executable("echo a b", env={"A": "1"}),
        executable("echo a b", cwd="/tmp"),
    ]
    assert len(set(keys)) == len(keys)
    assert executable("echo a b", env={"A": "1", "B": "2"}) == executable(
        "echo a b", env={"B": "2", "A": "1"}
    )


# -- across interpreters --------------------------------------------------------------

KEY_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, pickle, sys
    from asyncflow.checkpoint import task_key
    from asyncflow.tasks import TaskDefinition, TaskFuture, TaskKind, TaskOptions

    spec = importlib.util.spec_from_file_location("workflow", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules["workflow"] = module
    spec.loader.exec_module(module)
    loop = asyncio.new_event_loop()
    task = TaskFuture(loop=loop)
    task._definition = TaskDefinition(
        module.task, TaskKind.FUNCTION, {}, None, TaskOptions()
    )
    task.args = getattr(module, "ARGS", (1,))
    task.kwargs = {}
    print(task_key(task), pickle.dumps(task.args).hex())
    """
)


def child_key(
    tmp_path: Path, source: str, seed: int = 0, name: str = "workflow.py"
) -> tuple[str, str]:
    """The key (and the arguments' pickle) a fresh interpreter computes."""
    script = tmp_path / "key_script.py"
    script.write_text(KEY_SCRIPT)
    module = tmp_path / name
    module.write_text(textwrap.dedent(source))
    done = subprocess.run(
        [sys.executable, str(script), str(module)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": str(seed)},
    )
    assert done.returncode == 0, done.stderr
    key_hex, pickled = done.stdout.split()
    return key_hex, pickled


BASE = """
    OFFSET = 1
    FACTOR = 2

    def helper(x):
        return x + OFFSET

    def make(scale):
        def task(x, bias=OFFSET):
            return helper(x) * FACTOR * scale + bias
        return task

    task = make(3)
"""


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("FACTOR = 2", "FACTOR = 5"),  # a module-level constant the body reads
        ("return x + OFFSET", "return x - OFFSET"),  # a helper it calls
        ("task = make(3)", "task = make(4)"),  # a value its closure holds
        ("def task(x, bias=OFFSET)", "def task(x, bias=FACTOR)"),  # a default
        ("OFFSET = 1", "OFFSET = 7"),  # a constant a default and a helper read
    ],
    ids=["constant", "helper", "closure", "default", "default-constant"],
)
def test_a_changed_dependency_changes_the_key_in_a_new_interpreter(
    tmp_path: Path, old: str, new: str
) -> None:
    assert old in BASE
    before, _ = child_key(tmp_path, BASE, seed=1)
    after, _ = child_key(tmp_path, BASE.replace(old, new), seed=2)
    assert before != after


def test_the_same_code_has_the_same_key_under_any_hash_seed_and_file(
    tmp_path: Path,
) -> None:
    keys = {child_key(tmp_path, BASE, seed=seed)[0] for seed in (0, 1, 2, 3)}
    # Moving the code, adding comments and blank lines keeps the key.
    moved = "\n\n    # a comment\n" + BASE.replace(
        "def helper", "# note\n    def helper"
    )
    keys.add(child_key(tmp_path, moved, seed=4, name="elsewhere.py")[0])
    assert len(keys) == 1


def test_sets_nested_in_objects_give_one_key_under_any_hash_seed(
    tmp_path: Path,
) -> None:
    source = """
        import dataclasses

        NAMES = [f"tag-{i}" for i in range(32)]

        class Bag:
            def __init__(self):
                self.tags = set(NAMES)
                self.index = {frozenset(NAMES[:8]): {"nested": set(NAMES[8:])}}

        class Slotted:
            __slots__ = ("members",)
            def __init__(self):
                self.members = frozenset(NAMES)

        @dataclasses.dataclass
        class Record:
            labels: set
            bag: Bag

        def task(*args):
            return None

        ARGS = (Bag(), Slotted(), Record(set(NAMES), Bag()), [(set(NAMES),)])
    """
    results = [child_key(tmp_path, source, seed=seed) for seed in range(1, 6)]
    # The test means something: pickle itself differs between these seeds.
    assert len({pickled for _, pickled in results}) > 1
    assert len({key_hex for key_hex, _ in results}) == 1
