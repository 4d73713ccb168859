"""Helpers for tests that check which processes are still running."""

from __future__ import annotations

from collections.abc import Iterable

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
