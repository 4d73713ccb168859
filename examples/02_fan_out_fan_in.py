"""Fan out over independent chunks of work, then fan in to one result.

Counts the primes below 50,000 by splitting the range into chunks that run in
parallel; a single task adds the partial counts up. The chunks are given to
``total`` as a list of futures: futures inside a list are dependencies too.
"""

import asyncio
import math

from asyncflow import WorkflowEngine

LIMIT = 50_000
CHUNKS = 8


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


async def main() -> None:
    async with await WorkflowEngine.create() as flow:

        @flow.function_task
        def count_primes(start: int, stop: int) -> int:
            return sum(1 for n in range(start, stop) if is_prime(n))

        @flow.function_task
        def total(counts: list[int]) -> int:
            return sum(counts)

        step = LIMIT // CHUNKS
        partials = [count_primes(i * step, (i + 1) * step) for i in range(CHUNKS)]
        answer = total(partials)

        print(f"{len(partials)} chunks registered, all {partials[0].state}")
        print(f"primes below {LIMIT}: {await answer}")
        print("partial counts:", [p.result() for p in partials])


if __name__ == "__main__":
    asyncio.run(main())
