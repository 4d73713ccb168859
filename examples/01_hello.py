"""The smallest workflow: two tasks, one dependency, one await.

Run it with ``python examples/01_hello.py``.
"""

import asyncio

from asyncflow import WorkflowEngine


async def main() -> None:
    async with await WorkflowEngine.create() as flow:

        @flow.function_task
        async def greet(name: str) -> str:
            return f"Hello, {name}!"

        @flow.function_task
        def shout(text: str) -> str:
            return text.upper()

        # Calling a task returns a future at once; passing it on is the
        # dependency. Only the root is awaited.
        loud = shout(greet("AsyncFlow"))
        print(await loud)
        print(f"{loud.uid} {loud.name} ended {loud.state}")


if __name__ == "__main__":
    asyncio.run(main())
