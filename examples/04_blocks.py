"""Blocks: sub-workflows with one future, decisions, nesting, cancellation.

A ``sweep`` block simulates a material at several temperatures and refines
the sweep where the results change fastest: a decision that needs values,
taken inside the block so that the rest of the workflow keeps running. A
``compare`` block depends on two sweeps. Finally a study is cancelled as a
whole, which stops every member it had started.
"""

import asyncio
from itertools import pairwise

from asyncflow import TaskFuture, WorkflowEngine

#: Stiffness at 0 K (GPa) and melting point (K) of a toy material model.
MATERIALS = {"steel": (200.0, 1700.0), "copper": (120.0, 1350.0)}


async def main() -> None:
    async with await WorkflowEngine.create() as flow:

        @flow.function_task
        def simulate(material: str, temperature: float) -> float:
            stiffness, melting = MATERIALS[material]
            return round(stiffness * (1 - temperature / melting) ** 2, 2)

        @flow.block
        async def sweep(material: str) -> dict[float, float]:
            temperatures = [300.0, 600.0, 900.0]
            runs = [simulate(material, t) for t in temperatures]
            values = await asyncio.gather(*runs)
            drops = [a - b for a, b in pairwise(values)]
            # Refine between the two points where the value drops most.
            worst = drops.index(max(drops))
            middle = (temperatures[worst] + temperatures[worst + 1]) / 2
            results = dict(zip(temperatures, values, strict=True))
            results[middle] = await simulate(material, middle)
            return dict(sorted(results.items()))

        @flow.block
        async def compare(steel: dict[float, float], copper: dict[float, float]) -> str:
            ratios = [steel[t] / copper[t] for t in steel if t in copper]
            return f"steel/copper stiffness ratio: {min(ratios):.3f}..{max(ratios):.3f}"

        steel, copper = sweep("steel"), sweep("copper")
        print(await compare(steel, copper))
        print("steel sweep:", await steel)

        # Cancelling a block cancels its unfinished members.
        members: list[TaskFuture] = []
        started = asyncio.Event()  # blocks run on this loop: asyncio objects work

        @flow.executable_task
        async def long_run(case: int) -> str:
            return f"sleep 30; echo {case}"

        @flow.block
        async def study() -> list[str]:
            members.extend(long_run(case) for case in range(3))
            started.set()
            return await asyncio.gather(*members)

        job = study()
        await started.wait()
        await asyncio.sleep(0.3)  # the study runs for a while, then is called off
        job.cancel("study no longer needed")
        print(f"study: {job.state}; members: {[str(m.state) for m in members]}")


if __name__ == "__main__":
    asyncio.run(main())
