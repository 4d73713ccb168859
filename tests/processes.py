"""Helpers for tests: which processes still run, and bounded waits for markers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable

import psutil


def alive(proc: psutil.Process) -> bool:
    """True while ``proc`` (the very process, not a reused PID) still runs."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_alive(procs: Iterable[psutil.Process]) -> None:
    """Kill whatever a failed test left running."""
    for proc in procs:
        if alive(proc):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def carrying(mark: dict[str, str]) -> list[psutil.Process]:
    """Live processes whose environment carries ``mark`` (one key, one value)."""
    (key, value), found = next(iter(mark.items())), []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(key) == value and alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def group_of(leader: int) -> list[psutil.Process]:
    """Every live process in the process group led by ``leader``.

    Each command runs in its own session, so its group holds the shell and
    everything it started (a shell may also exec its last command).
    """
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == leader:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


async def wait_until(
    predicate: Callable[[], bool], what: str, bound: float = 30.0
) -> None:
    """Bounded poll for a marker (a liveness bound, not a timing assumption)."""
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
