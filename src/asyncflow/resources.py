"""What a task needs (cpus, GPUs, memory, custom counts) and what a node has.

A task declares a request with ``resources={"cpus": 4, "gpus": 1, "memory":
"8GiB"}``; a local backend admits it through its :class:`Gate` only when all
of it is free, hands it a :class:`Grant` (which devices, how much), and takes
it back when the work ends. Inside the task, :func:`current_resources` tells
what it got.

Admission policy (docs/resources.md): ready tasks wait in priority order
(higher ``priority`` first, then call order). The first waiting task that
fits starts; tasks that fit may start ahead of one that does not (backfill),
but once a waiting task has been passed over :data:`BYPASS_LIMIT` times, no
task behind it starts until it has started, so large requests are never
starved.
"""

from __future__ import annotations

import contextvars
import heapq
import os
import re
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ResourceError

if TYPE_CHECKING:
    from .tasks import TaskDefinition, TaskFuture

__all__ = [
    "BYPASS_LIMIT",
    "Capacity",
    "Gate",
    "Grant",
    "Request",
    "current_resources",
    "parse_memory",
]

#: How often a waiting task may be passed over by tasks behind it that fit,
#: before it reserves what frees up for itself.
BYPASS_LIMIT = 8
#: How many waiting tasks one worker may take at once (see Gate.release).
CHUNK = 16
#: Tasks that took less than this (seconds, on average) count as short.
SHORT_TASK = 0.0005

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_memory(value: Any, what: str = "memory") -> int:
    """Bytes from an int or a string with a unit: ``"8GiB"``, ``"512MB"``,
    ``"1.5G"``. ``K``/``KB``, ``M``/``MB``, ... are powers of 1000;
    ``Ki``/``KiB``, ``Mi``/``MiB``, ... powers of 1024."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(
            f"{what} must be a number of bytes or a string such as '8GiB', "
            f"got {type(value).__name__}"
        )
    if isinstance(value, str):
        match = _MEMORY.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{what} {value!r} is not a size: write bytes or a number with "
                "a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        number = float(match.group(1)) * _UNITS[unit]
    else:
        number = value
    if not 0 <= number < float("inf"):  # NaN and infinity fail too
        raise ValueError(f"{what} must be a finite number >= 0 bytes, got {value!r}")
    return int(number)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


class Request:
    """What one task asks for; built from a ``resources=`` mapping."""

    __slots__ = ("_hash", "cpus", "custom", "gpus", "memory")

    def __init__(
        self,
        cpus: int = 1,
        gpus: int = 0,
        memory: int = 0,
        custom: Mapping[str, int] | None = None,
    ) -> None:
        self.cpus = cpus
        self.gpus = gpus
        self.memory = memory
        self.custom: dict[str, int] = dict(custom or {})
        self._hash: int | None = None  # a request is never changed once made

    @classmethod
    def parse(cls, resources: Any) -> Request | None:
        """A request from ``resources=`` (None stays None: the default)."""
        if resources is None or isinstance(resources, Request):
            return resources
        if not isinstance(resources, Mapping):
            raise TypeError(
                "resources must be a mapping such as "
                "{'cpus': 4, 'gpus': 1, 'memory': '8GiB'}, got "
                f"{type(resources).__name__}"
            )
        cpus, gpus, memory = 1, 0, 0
        custom: dict[str, int] = {}
        for key, value in resources.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"resource names must be strings, got {key!r}")
            if key == "cpus":
                cpus = _count(value, "resources['cpus']")
            elif key == "gpus":
                gpus = _count(value, "resources['gpus']")
            elif key == "memory":
                memory = parse_memory(value, "resources['memory']")
            else:
                custom[key] = _count(value, f"resources[{key!r}]")
        return cls(cpus, gpus, memory, custom)

    def as_dict(self) -> dict[str, int]:
        """The request as a plain mapping (zero entries left out, cpus kept)."""
        out = {"cpus": self.cpus}
        if self.gpus:
            out["gpus"] = self.gpus
        if self.memory:
            out["memory"] = self.memory
        out.update(self.custom)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self.as_dict() == other.as_dict()

    def __reduce__(self) -> tuple[type[Request], tuple[int, int, int, dict[str, int]]]:
        # Not the cached hash: string hashes differ between processes.
        return Request, (self.cpus, self.gpus, self.memory, self.custom)

    def __hash__(self) -> int:
        # Waiting tasks are queued by request: hashed once per task.
        if self._hash is None:
            self._hash = hash(tuple(sorted(self.as_dict().items())))
        return self._hash

    def __repr__(self) -> str:
        return f"Request({self.as_dict()!r})"


#: What a task that declares nothing asks for.
DEFAULT_REQUEST = Request()


class Grant:
    """What one attempt of a task was given: counts and the exact devices."""

    __slots__ = ("cpu_ids", "cpus", "custom", "gpus", "memory")

    def __init__(
        self,
        cpus: int,
        gpus: tuple[str, ...] = (),
        memory: int = 0,
        custom: Mapping[str, int] | None = None,
        cpu_ids: tuple[int, ...] = (),
    ) -> None:
        self.cpus = cpus
        self.gpus = gpus
        self.memory = memory
        self.custom = dict(custom or {})
        self.cpu_ids = cpu_ids

    def as_dict(self) -> dict[str, Any]:
        """``{"cpus": 2, "gpus": ["1"], "memory": 8589934592, ...}``."""
        out: dict[str, Any] = {
            "cpus": self.cpus,
            "gpus": list(self.gpus),
            "memory": self.memory,
        }
        out.update(self.custom)
        if self.cpu_ids:
            out["cpu_ids"] = list(self.cpu_ids)
        return out

    def environment(self, manages_gpus: bool) -> dict[str, str]:
        """Variables that place a command on exactly this grant."""
        env = {"OMP_NUM_THREADS": str(max(self.cpus, 1))}
        if manages_gpus or self.gpus:
            devices = ",".join(self.gpus)
            env["CUDA_VISIBLE_DEVICES"] = devices
            env["HIP_VISIBLE_DEVICES"] = devices
            env["ROCR_VISIBLE_DEVICES"] = devices
            env["ZE_AFFINITY_MASK"] = devices
        return env

    def __repr__(self) -> str:
        return f"Grant({self.as_dict()!r})"


#: What a task that declares nothing gets where CPUs are not pinned.
DEFAULT_GRANT = Grant(1)

_current: contextvars.ContextVar[Grant | None] = contextvars.ContextVar(
    "asyncflow.resources", default=None
)


def current_resources() -> dict[str, Any]:
    """What the running task was given, e.g. ``{"cpus": 2, "gpus": ["1"],
    "memory": 8589934592}`` plus any custom resources it asked for.

    Works in task bodies on threads, in processes and on asyncio; each task
    sees only its own grant. Outside a task it returns ``{}``.
    """
    grant = _current.get()
    return {} if grant is None else grant.as_dict()


def set_current(grant: Grant | None) -> contextvars.Token[Grant | None]:
    """Make ``grant`` what :func:`current_resources` returns here."""
    return _current.set(grant)


def reset_current(token: contextvars.Token[Grant | None]) -> None:
    _current.reset(token)


# -- detection ---------------------------------------------------------------


def detect_cpus() -> int:
    """CPUs this process may run on (its affinity), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _device_list(value: str) -> list[str] | None:
    value = value.strip()
    if value in ("", "-1", "NoDevFiles", "none"):
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def detect_gpus() -> list[str]:
    """GPU ids from ``CUDA_VISIBLE_DEVICES`` (or ``HIP_VISIBLE_DEVICES`` /
    ``ROCR_VISIBLE_DEVICES``) when set, else ``nvidia-smi -L`` when the
    driver's tool is installed, else none."""
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None:
            return _device_list(value) or []
    import shutil

    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        listing = subprocess.run(
            [tool, "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        match.group(1)
        for match in re.finditer(r"^GPU (\d+):", listing, flags=re.MULTILINE)
    ]


def detect_memory() -> int:
    """Physical memory in bytes, or the cgroup's limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 0
    for path in (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and (total == 0 or int(text) < total):
            total = int(text)
    return total


class Capacity:
    """What one backend may hand out: ``None`` for a kind means unlimited.

    ``gpus`` and ``memory`` are detected when first needed unless given.
    """

    def __init__(
        self,
        cpus: int | None = None,
        gpus: int | Sequence[str] | str | None = None,
        memory: int | str | None = None,
        custom: Mapping[str, int] | None = None,
        *,
        default_cpus: int | None = None,
        pin_cpus: bool = False,
    ) -> None:
        if cpus is not None:
            cpus = _count(cpus, "cpus")
            if cpus < 1:
                raise ValueError(f"cpus must be >= 1, got {cpus}")
        self.cpus: int | None = cpus if cpus is not None else default_cpus
        self._gpus: list[str] | None
        if gpus is None:
            self._gpus = None
        elif isinstance(gpus, str):
            self._gpus = _device_list(gpus)
        elif isinstance(gpus, int) and not isinstance(gpus, bool):
            self._gpus = [str(i) for i in range(_count(gpus, "gpus"))]
        elif isinstance(gpus, Sequence):
            self._gpus = [str(g) for g in gpus]
            if len(set(self._gpus)) != len(self._gpus):
                raise ValueError(f"gpus lists a device twice: {list(gpus)!r}")
        else:
            raise TypeError(
                "gpus must be a count, a list of device ids or a "
                f"comma-separated string, got {type(gpus).__name__}"
            )
        self._memory = None if memory is None else parse_memory(memory, "memory")
        self.custom: dict[str, int] = {
            str(k): _count(v, f"custom[{k!r}]") for k, v in (custom or {}).items()
        }
        self.pin_cpus = pin_cpus
        self.cpu_ids: list[int] = []
        if pin_cpus:
            try:
                ids = sorted(os.sched_getaffinity(0))
            except (AttributeError, OSError):  # pragma: no cover - not Linux
                ids = list(range(os.cpu_count() or 1))
            self.cpu_ids = ids[: self.cpus] if self.cpus else ids
            if self.cpus is None or self.cpus > len(self.cpu_ids):
                self.cpus = len(self.cpu_ids)

    @property
    def gpus(self) -> list[str]:
        if self._gpus is None:
            self._gpus = detect_gpus()
        return self._gpus

    @property
    def memory(self) -> int:
        if self._memory is None:
            self._memory = detect_memory()
        return self._memory

    @property
    def manages_gpus(self) -> bool:
        """True when the capacity has GPUs (detected on first use)."""
        return bool(self.gpus)

    def check(self, request: Request, where: str = "") -> None:
        """Raise :class:`ResourceError` if ``request`` can never fit."""
        if self.cpus is not None and request.cpus > self.cpus:
            raise ResourceError("cpus", request.cpus, self.cpus, where)
        if request.gpus and request.gpus > len(self.gpus):
            raise ResourceError("gpus", request.gpus, len(self.gpus), where)
        if request.memory and request.memory > self.memory:
            raise ResourceError("memory", request.memory, self.memory, where)
        for key, amount in request.custom.items():
            have = self.custom.get(key, 0)
            if amount > have:
                raise ResourceError(key, amount, have, where)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "gpus": list(self.gpus),
            "memory": self.memory,
            **self.custom,
        }

    def __repr__(self) -> str:
        return f"Capacity({self.as_dict()!r})"


# -- admission ----------------------------------------------------------------

_EXECUTABLE: Any = None  # TaskKind.EXECUTABLE, once a Gate exists


class Held(deque[tuple["TaskFuture", int]]):
    """Tasks (with their attempt) that one worker took to run one after the
    other in the slot and with the grant of the task it took them with; they
    all ask for ``request``."""

    __slots__ = ("request",)

    def __init__(self, request: Request) -> None:
        super().__init__()
        self.request = request


#: A waiting task: [task, attempt, request, lane, times passed over, call
#: order].
_Entry = list[Any]


class Gate:
    """Admits tasks against a :class:`Capacity` and per-lane slot limits.

    Waiting tasks are kept in one queue per class: the same lane, priority
    and request (calls of one definition share their request object), in
    call order. Admission looks at the head of each class in priority, then
    call order; a head that does not fit blocks its class only (the tasks
    behind it ask for the same), so backfill costs one check per class, not
    per waiting task.

    Thread-safe: :meth:`offer` runs on the loop thread, :meth:`release` in
    whichever thread the work ended. ``start(task, attempt, grant)`` is
    called for each admitted task, outside the lock, in the thread that
    admitted it. ``dropped(task)`` is called (under the lock) for each
    waiting task found cancelled or retried meanwhile.
    """

    def __init__(
        self,
        capacity: Capacity,
        lanes: Mapping[str, int | None],
        start: Callable[[TaskFuture, int, Grant], None],
        name: str = "",
        dropped: Callable[[TaskFuture], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.where = f"backend {name!r}" if name else ""
        self._lock = threading.Lock()
        self._start = start
        self._dropped = dropped
        self._slots: dict[str, int | None] = dict(lanes)
        self._busy: dict[str, int] = dict.fromkeys(lanes, 0)
        self._cpus_used = 0
        self._memory_used = 0
        self._custom_used: dict[str, int] = {}
        self._free_gpus: deque[str] | None = None
        self._free_cpu_ids: list[int] = list(capacity.cpu_ids)
        # Waiting tasks: (lane, priority, request) -> entries in call order.
        self._classes: dict[tuple[str, int, Request], deque[_Entry]] = {}
        self._count = 0  # call order of waiting entries
        self._lane_waiting: dict[str, int] = dict.fromkeys(lanes, 0)
        # Chunks taken by workers and not run yet (see release()).
        self._held: dict[int, Held] = {}
        # The last request found to fit the capacity (checked once per run
        # of calls of one definition).
        self._fits_once: Request | None = None
        self.closed = False
        from .tasks import TaskKind, TaskState

        self._running = TaskState.RUNNING
        global _EXECUTABLE
        _EXECUTABLE = TaskKind.EXECUTABLE

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def offer(
        self, tasks: Sequence[TaskFuture], front: bool = False
    ) -> list[tuple[TaskFuture, ResourceError]]:
        """Start each task (at its current attempt) now if it fits, else
        queue it; ``front`` queues ahead of the tasks of its class.

        Returns the tasks whose request is larger than the capacity, each
        with its :class:`ResourceError`: they can never start.
        """
        refused: list[tuple[TaskFuture, ResourceError]] = []
        started: list[tuple[TaskFuture, int, Grant]] = []
        executable = _EXECUTABLE
        with self._lock:
            for task in tasks:
                definition = task._definition
                request = definition.resources or DEFAULT_REQUEST
                if request is not DEFAULT_REQUEST and request is not self._fits_once:
                    try:
                        self.capacity.check(request, self.where)
                    except ResourceError as exc:
                        refused.append((task, exc))
                        continue
                    self._fits_once = request
                lane = "exec" if definition.kind is executable else "fn"
                if not self._classes and self._fits(request, lane):
                    started.append((task, task.attempts, self._take(request, lane)))
                    continue
                key = (lane, definition.priority, request)
                queue = self._classes.get(key)
                if queue is None:
                    queue = self._classes[key] = deque()
                    behind = False
                else:
                    # Tasks of its class already wait: it cannot start
                    # before them, and nothing was freed since they could not.
                    behind = bool(queue)
                self._count += 1
                entry: _Entry = [
                    task,
                    task.attempts,
                    request,
                    lane,
                    0,
                    -self._count if front else self._count,
                ]
                if front:
                    queue.appendleft(entry)
                else:
                    queue.append(entry)
                self._lane_waiting[lane] += 1
                # Nothing was freed: only the new task itself may start now.
                if not behind and self._fits(request, lane):
                    started.extend(
                        (e[0], e[1], granted) for e, granted in self._admit()
                    )
        start = self._start
        for task, attempt, grant in started:
            start(task, attempt, grant)
        return refused

    def release(
        self,
        grant: Grant,
        lane: str,
        keep: str | None = None,
        short: TaskDefinition | None = None,
    ) -> tuple[tuple[TaskFuture, int, Grant], Held | None] | None:
        """Give back what an attempt held; start what now fits.

        With ``keep``, the first admitted task of that lane is not started
        but returned, for the caller to run itself. When that task's
        definition is ``short`` (its calls just ran short) and nothing else
        is ahead of its class, up to :data:`CHUNK` more waiting calls of the
        same definition come with it as a :data:`Held` queue: the caller
        runs them one after the other in the same slot and with the same
        grant (one lock round per chunk instead of one per task), then calls
        :meth:`unhold` and releases the first one's grant once. A caller
        left with nothing takes over the last task held by another (so a
        long task never keeps short ones from an idle worker).
        """
        with self._lock:
            self._busy[lane] -= 1
            self._cpus_used -= grant.cpus
            self._memory_used -= grant.memory
            if grant.gpus:
                assert self._free_gpus is not None
                self._free_gpus.extend(grant.gpus)
            if grant.cpu_ids:
                self._free_cpu_ids.extend(grant.cpu_ids)
                self._free_cpu_ids.sort()
            if grant.custom:
                used = self._custom_used
                for key, amount in grant.custom.items():
                    used[key] -= amount
            admitted = self._admit() if self._classes else None
            kept: tuple[tuple[TaskFuture, int, Grant], Held | None] | None = None
            if admitted:
                for index, (entry, granted) in enumerate(admitted):
                    if entry[3] == keep:
                        del admitted[index]
                        held = None
                        task = entry[0]
                        if short is not None and task._definition is short:
                            held = self._chunk(entry, task._definition)
                        kept = ((task, entry[1], granted), held)
                        break
            if kept is None and keep is not None and self._held:
                kept = self._steal(keep)
        if admitted:
            for entry, granted in admitted:
                self._start(entry[0], entry[1], granted)
        return kept

    def unhold(self, held: Held) -> None:
        """A held queue is done with (empty, or its owner stops)."""
        with self._lock:
            self._held.pop(id(held), None)

    def close(self) -> list[TaskFuture]:
        """Admit nothing more; return the tasks that were waiting."""
        with self._lock:
            self.closed = True
            left = [e[0] for q in self._classes.values() for e in q]
            self._classes.clear()
            self._lane_waiting = dict.fromkeys(self._lane_waiting, 0)
        return left

    # -- under the lock --------------------------------------------------------

    def _steal(self, lane: str) -> tuple[tuple[TaskFuture, int, Grant], None] | None:
        for held in self._held.values():
            request = held.request
            if not self._fits(request, lane):
                continue
            try:
                task, attempt = held.pop()  # the owner takes from the left
            except IndexError:
                continue
            return (task, attempt, self._take(request, lane)), None
        return None

    def _chunk(self, kept: _Entry, definition: TaskDefinition) -> Held | None:
        """Calls of ``definition`` right behind ``kept`` in its class, when no
        other class has a waiting task ahead of them."""
        lane, request = kept[3], kept[2]
        queue = self._classes.get((lane, definition.priority, request))
        if not queue:
            return None
        slots = self._slots[lane] or 1
        size = min(CHUNK, (self._lane_waiting[lane] - slots) // slots)
        if size < 1:
            return None
        first = queue[0][5]
        priority = definition.priority
        for (other_lane, other_priority, _), other in self._classes.items():
            ahead = other_priority > priority or (
                other_priority == priority and bool(other) and other[0][5] < first
            )
            if ahead and other and other is not queue and other_lane == lane:
                return None  # something else comes first
        running = self._running
        held = Held(request)
        while queue and size > 0:
            entry = queue[0]
            task = entry[0]
            if task._definition is not definition:
                break
            queue.popleft()
            self._lane_waiting[lane] -= 1
            if task.state is not running or task.attempts != entry[1]:
                self._drop(task)
                continue
            held.append((task, entry[1]))
            size -= 1
        self._drop_empty()
        if not held:
            return None
        self._held[id(held)] = held
        return held

    def _fits(self, request: Request, lane: str) -> bool:
        if self.closed:
            return False
        slots = self._slots[lane]
        if slots is not None and self._busy[lane] >= slots:
            return False
        return self._resources_fit(request)

    def _resources_fit(self, request: Request) -> bool:
        capacity = self.capacity
        if capacity.cpus is not None and self._cpus_used + request.cpus > capacity.cpus:
            return False
        if request.gpus:
            if self._free_gpus is None:
                self._free_gpus = deque(capacity.gpus)
            if request.gpus > len(self._free_gpus):
                return False
        if request.memory and self._memory_used + request.memory > capacity.memory:
            return False
        if request.custom:
            used = self._custom_used
            have = capacity.custom
            for key, amount in request.custom.items():
                if used.get(key, 0) + amount > have.get(key, 0):
                    return False
        return True

    def _take(self, request: Request, lane: str) -> Grant:
        if request is DEFAULT_REQUEST and not self._free_cpu_ids:
            self._busy[lane] += 1
            self._cpus_used += 1
            return DEFAULT_GRANT
        self._busy[lane] += 1
        self._cpus_used += request.cpus
        self._memory_used += request.memory
        gpus: tuple[str, ...] = ()
        if request.gpus:
            assert self._free_gpus is not None
            gpus = tuple(self._free_gpus.popleft() for _ in range(request.gpus))
        cpu_ids: tuple[int, ...] = ()
        if self._free_cpu_ids and request.cpus:
            cpu_ids = tuple(self._free_cpu_ids[: request.cpus])
            del self._free_cpu_ids[: request.cpus]
        if request.custom:
            used = self._custom_used
            for key, amount in request.custom.items():
                used[key] = used.get(key, 0) + amount
        return Grant(request.cpus, gpus, request.memory, request.custom, cpu_ids)

    def _drop(self, task: TaskFuture) -> None:
        if self._dropped is not None:
            self._dropped(task)

    def _lane_open(self, lane: str) -> bool:
        slots = self._slots[lane]
        return slots is None or self._busy[lane] < slots

    def _admit(self) -> list[tuple[_Entry, Grant]]:
        """Admit waiting tasks that fit: the heads of the classes, in priority
        then call order, as long as their lanes have room."""
        admitted: list[tuple[_Entry, Grant]] = []
        if self.closed:
            return admitted
        running = self._running
        heads = []
        for key, queue in self._classes.items():
            while queue:
                entry = queue[0]
                if entry[0].state is running and entry[0].attempts == entry[1]:
                    break
                queue.popleft()  # cancelled or retried meanwhile
                self._lane_waiting[key[0]] -= 1
                self._drop(entry[0])
            if queue and self._lane_open(key[0]):
                heads.append((-key[1], queue[0][5], key))
        if not heads:
            self._drop_empty()
            return admitted
        heapq.heapify(heads)
        blocked: list[_Entry] = []  # heads waiting for resources
        while heads:
            _, _, key = heapq.heappop(heads)
            lane = key[0]
            if not self._lane_open(lane):
                continue
            queue = self._classes[key]
            while queue:
                entry = queue[0]
                if entry[0].state is running and entry[0].attempts == entry[1]:
                    break
                queue.popleft()
                self._lane_waiting[lane] -= 1
                self._drop(entry[0])
            if not queue:
                continue
            entry = queue[0]
            if self._resources_fit(entry[2]):
                queue.popleft()
                self._lane_waiting[lane] -= 1
                admitted.append((entry, self._take(entry[2], lane)))
                for waiting in blocked:
                    waiting[4] += 1
                if queue:
                    heapq.heappush(heads, (-key[1], queue[0][5], key))
                continue
            if entry[4] >= BYPASS_LIMIT:
                break  # it has waited long enough: what frees up is its
            blocked.append(entry)  # its class waits; others may pass, a while
        self._drop_empty()
        return admitted

    def _drop_empty(self) -> None:
        empty = [key for key, queue in self._classes.items() if not queue]
        for key in empty:
            del self._classes[key]
