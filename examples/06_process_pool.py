"""CPU-bound work in a process pool, with functions defined right here.

Threads cannot run pure-Python computations in parallel (the GIL), worker
processes can. AsyncFlow ships each task's function to the workers with
cloudpickle, so a lambda, a closure over local variables, or an ``async def``
written in this script work as tasks: nothing has to live in an importable
module.

Keep ``asyncio.run`` under ``if __name__ == "__main__":`` in process-pool
scripts: with the ``spawn``/``forkserver`` start methods every worker imports
this file.
"""

import asyncio
import os
from concurrent.futures import ProcessPoolExecutor

from asyncflow import LocalExecutionBackend, WorkflowEngine


async def main() -> None:
    backend = LocalExecutionBackend(ProcessPoolExecutor(max_workers=2))
    async with await WorkflowEngine.create(backend) as flow:
        max_steps = 10_000  # captured by the closure below, shipped with it

        def collatz_steps(n: int) -> int:
            steps = 0
            while n != 1 and steps < max_steps:
                n = n // 2 if n % 2 == 0 else 3 * n + 1
                steps += 1
            return steps

        longest = flow.function_task(
            lambda start, stop: max(range(start, stop), key=collatz_steps)
        )
        steps = flow.function_task(collatz_steps)

        @flow.function_task
        async def where() -> int:
            await asyncio.sleep(0)  # async bodies run on the worker's own loop
            return os.getpid()

        bounds = [(1, 25_000), (25_000, 50_000), (50_000, 75_000), (75_000, 100_000)]
        winners = await asyncio.gather(*(longest(a, b) for a, b in bounds))
        best = max(winners, key=collatz_steps)
        print(f"longest Collatz chain below 100000 starts at {best}")
        print(f"it takes {await steps(best)} steps")
        worker = await where()
        print(f"bodies ran in a worker process: {worker != os.getpid()}")


if __name__ == "__main__":
    asyncio.run(main())
