"""What happens when things go wrong, and how to see it.

- a flaky task succeeds thanks to ``retries=``;
- a failure stops everything downstream of it (``DependencyFailureError``
  with the root cause), and nothing else;
- a cancelled task cancels its dependents;
- a hung command is stopped by ``timeout=``;
- one done-callback tallies every outcome, with no coroutine per task.
"""

import asyncio
from collections import Counter

from asyncflow import (
    DependencyFailureError,
    TaskFuture,
    TaskTimeoutError,
    WorkflowEngine,
)


async def main() -> None:
    outcomes: Counter[str] = Counter()

    def tally(fut: TaskFuture) -> None:
        outcomes[str(fut.state)] += 1  # already terminal when callbacks run

    async with await WorkflowEngine.create() as flow:
        calls = 0

        @flow.function_task(retries=3, retry_on=ConnectionError)
        def flaky_download() -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise ConnectionError(f"connection reset (call {calls})")
            return "42"

        @flow.function_task
        def parse(text: str) -> int:
            return int(text)

        @flow.function_task
        def double(x: int) -> int:
            return 2 * x

        @flow.executable_task(timeout=0.5)
        async def hung_solver() -> str:
            return "sleep 30"

        download = flaky_download()
        good = double(parse(download))
        bad = double(double(parse("forty-two")))
        waiting = double(parse("7"))
        solver = hung_solver()
        for fut in (download, good, bad, waiting, solver):
            fut.add_done_callback(tally)
        waiting.cancel("not needed after all")

        print(f"flaky download: {await good} after {download.attempts} attempts")
        try:
            await bad
        except DependencyFailureError as error:
            print(
                f"bad input: {bad.name} failed because of {error.failed_dependencies}"
            )
            print(f"  root cause: {error.root_cause!r}")
        try:
            await waiting
        except asyncio.CancelledError:
            print(f"cancelled: {waiting.name} is {waiting.state}")
        try:
            await solver
        except TaskTimeoutError as error:
            print(f"timeout: {error}")

        await asyncio.sleep(0)  # let the last done-callbacks run
        print("outcomes:", ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))


if __name__ == "__main__":
    asyncio.run(main())
