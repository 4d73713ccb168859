"""Executable tasks: commands whose standard output is the task's result.

Shows a shell pipeline fed by an upstream task, a command run without a shell
(``{"shell": False}``), ``env`` and ``cwd`` in the task description, and what
an ``ExecutableError`` carries when a command fails.
"""

import asyncio
import tempfile
from pathlib import Path

from asyncflow import ExecutableError, WorkflowEngine


async def main(workdir: Path) -> None:
    async with await WorkflowEngine.create() as flow:

        @flow.function_task
        def write_numbers(path: str, count: int) -> str:
            Path(path).write_text("".join(f"{i}\n" for i in range(1, count + 1)))
            return path

        @flow.executable_task
        async def add_up(path: str) -> str:
            return f"awk '{{s += $1}} END {{print s}}' {path}"

        # The engine only reads this default (it is never mutated), hence noqa.
        @flow.executable_task
        async def list_dir(after: str, task_description={"shell": False}) -> str:  # noqa: B006
            # `after` is unused by the command: passing the future orders this
            # task after the file has been written.
            return "ls -1"

        @flow.executable_task
        async def describe_run(label: str) -> str:
            return f'echo "{label} run by $RUN_OWNER"'

        @flow.executable_task
        async def convert(path: str) -> str:
            return f"echo 'cannot read {path}' >&2; exit 3"

        numbers = write_numbers(str(workdir / "numbers.txt"), 100)
        total = add_up(numbers)
        listing = list_dir(numbers, task_description={"cwd": str(workdir)})
        owner = {"env": {"RUN_OWNER": "the lab"}}
        described = describe_run("campaign-7", task_description=owner)

        print("sum of 1..100 computed by awk:", (await total).strip())
        print("files in the work directory:", (await listing).split())
        print((await described).strip())

        try:
            await convert("missing.dat")
        except ExecutableError as error:
            print(f"convert failed with exit code {error.exit_code}")
            print(f"its stderr said: {error.stderr.strip()}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="asyncflow-example-") as directory:
        asyncio.run(main(Path(directory)))
