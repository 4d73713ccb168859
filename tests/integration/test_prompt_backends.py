"""Prompt backends that do real work: a callable, and an OpenAI-compatible API.

``OpenAIChatBackend`` is exercised against :class:`ChatServer`, a small HTTP
server started on 127.0.0.1 for each test, implementing
``/v1/chat/completions`` with asyncio streams. It records when each request
arrived, its headers and its JSON body, and answers with a scripted reply:
a status, headers and body, or ``HANG`` (never answer; note when the client
closes the connection).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asyncflow import (
    AsyncioExecutionBackend,
    CallablePromptBackend,
    DependencyFailureError,
    OpenAIChatBackend,
    TaskEvent,
    TaskTimeoutError,
    WorkflowEngine,
)
from asyncflow.backends.prompt import (
    ChatAuthenticationError,
    ChatCompletionError,
    ChatConnectionError,
    ChatHTTPError,
    ChatRateLimitError,
    ChatResponseError,
    ChatServerError,
    ChatTimeoutError,
    PromptBackendError,
)
from asyncflow.errors import AsyncFlowError

#: Bound on every wait for something that must happen (not a speed claim).
LIVENESS = 20.0
KEY = "sk-test-SECRET-5f1c2a9e7b3d"

HANG = "hang"
Reply = tuple[int, dict[str, str], bytes] | str


def completion(text: str, *, finish_reason: str = "stop", **extra: Any) -> Reply:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        **extra,
    }
    return 200, {}, json.dumps(body).encode()


def api_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> Reply:
    body = {"error": {"message": message, "type": "test_error", "code": None}}
    return status, headers or {}, json.dumps(body).encode()


@dataclass
class Seen:
    at: float  # time.time() when the request had fully arrived
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ChatServer:
    """``script(n, request)`` gives the reply to the n-th request (from 0)."""

    script: Callable[[int, Seen], Reply]
    requests: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    closed_by_client: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def wait_for_requests(self, count: int) -> None:
        async def enough() -> None:
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), LIVENESS)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    self.closed_by_client += 1
                    return
                _method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    header = await reader.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                size = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(size) if size else b""
                seen = Seen(time.time(), target, headers, json.loads(raw or b"null"))
                self.requests.append(seen)
                self.arrived.set()
                reply = self.script(len(self.requests) - 1, seen)
                if reply == HANG:
                    await reader.read()  # returns once the client hangs up
                    self.disconnected.set()
                    return
                assert not isinstance(reply, str)
                status, extra, payload = reply
                phrase = http.HTTPStatus(status).phrase
                head = (
                    f"HTTP/1.1 {status} {phrase}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                    + "\r\n"
                )
                writer.write(head.encode("latin-1") + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(handler)
            writer.close()


@pytest.fixture
async def chat_server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[ChatServer] = []

    async def start(
        script: Callable[[int, Seen], Reply] | list[Reply],
    ) -> tuple[ChatServer, str]:
        if isinstance(script, list):
            replies = script

            def script(n: int, _: Seen) -> Reply:
                return replies[min(n, len(replies) - 1)]

        server = ChatServer(script)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    """``await engines(prompt_backend, **create_kwargs)``: an engine whose
    default backend is asyncio and whose ``llm`` backend is the one given;
    shut down at teardown."""
    made: list[WorkflowEngine] = []

    async def make(backend: Any, **kwargs: Any) -> WorkflowEngine:
        flow = await WorkflowEngine.create(
            backend=[AsyncioExecutionBackend(), backend], **kwargs
        )
        made.append(flow)
        return flow

    yield make
    for flow in made:
        await asyncio.wait_for(flow.shutdown(timeout=5), LIVENESS)


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)


def chat_backend(url: str, **kwargs: Any) -> OpenAIChatBackend:
    settings: dict[str, Any] = {
        "base_url": url,
        "model": "test-model",
        "api_key": KEY,
        "retry_delay": 0.01,
        "max_retry_delay": 0.05,
    }
    settings.update(kwargs)
    return OpenAIChatBackend(**settings)


# -- CallablePromptBackend ----------------------------------------------------


async def test_a_callable_answers_prompts_built_from_dependencies(engines) -> None:
    asked: list[tuple[str, dict[str, Any]]] = []

    async def model(prompt: str, task_description: dict[str, Any]) -> str:
        asked.append((prompt, task_description))
        return f"{task_description.get('system', '')}|{prompt.upper()}"

    flow = await engines(CallablePromptBackend(model))

    @flow.function_task
    def load(topic: str) -> str:
        return f"facts about {topic}"

    @flow.prompt_task(backend="llm")
    async def ask(question: str, task_description={"system": "terse"}) -> str:  # noqa: B006
        return f"list {question}"

    @flow.function_task
    def combine(*answers: str) -> list[str]:
        return list(answers)

    first = ask(load("graphene"))
    second = ask(load("argon"), task_description={"system": "verbose"})
    assert await combine(first, second) == [
        "terse|LIST FACTS ABOUT GRAPHENE",
        "verbose|LIST FACTS ABOUT ARGON",
    ]
    assert sorted(prompt for prompt, _ in asked) == [
        "list facts about argon",
        "list facts about graphene",
    ]


async def test_a_plain_function_runs_in_a_thread(engines) -> None:
    threads: list[int] = []

    def blocking_model(prompt: str) -> str:
        threads.append(threading.get_ident())
        return prompt[::-1]

    flow = await engines(CallablePromptBackend(blocking_model))

    @flow.prompt_task(backend="llm")
    def ask(word: str) -> str:
        return word

    assert await ask("stressed") == "desserts"
    assert threads
    assert threads[0] != threading.get_ident()


@pytest.mark.parametrize("prompt", ["", 42, None])
async def test_an_empty_or_non_string_prompt_fails_before_the_model_is_called(
    engines, prompt: Any
) -> None:
    # SPEC §8: a prompt body must give a non-empty string.
    asked: list[str] = []

    async def model(text: str) -> str:
        asked.append(text)
        return "answer"

    flow = await engines(CallablePromptBackend(model))

    @flow.prompt_task(backend="llm")
    def ask() -> Any:
        return prompt

    with pytest.raises(ValueError, match="ask"):
        await ask()
    assert asked == []


async def test_shutdown_with_a_prompt_in_flight_never_hangs(engines) -> None:
    # SPEC §11: a model that never answers does not hold shutdown up.
    entered = asyncio.Event()

    async def stuck(text: str) -> str:
        entered.set()
        await asyncio.sleep(3600)
        return "never"

    flow = await engines(CallablePromptBackend(stuck))

    @flow.prompt_task(backend="llm")
    def ask() -> str:
        return "hello"

    pending = ask()
    await asyncio.wait_for(entered.wait(), LIVENESS)
    await asyncio.wait_for(flow.shutdown(timeout=2), LIVENESS)
    assert pending.cancelled()


async def test_the_callables_failure_fails_the_task_and_its_dependents(
    engines,
) -> None:
    async def broken(prompt: str) -> str:
        raise ValueError(f"model refused {prompt!r}")

    flow = await engines(CallablePromptBackend(broken))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hello"

    @flow.function_task
    def after(answer: str) -> str:
        return answer

    answer = ask()
    downstream = after(answer)
    with pytest.raises(ValueError, match="model refused 'hello'"):
        await answer
    with pytest.raises(DependencyFailureError) as caught:
        await downstream
    assert isinstance(caught.value.root_cause, ValueError)


async def test_an_answer_that_is_not_a_string_fails_the_task(engines) -> None:
    async def numbers(prompt: str) -> Any:
        return 42

    flow = await engines(CallablePromptBackend(numbers))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "how many?"

    with pytest.raises(TypeError, match=r"returned int .* must return the answer"):
        await ask()


async def test_max_concurrency_bounds_the_calls_in_flight(engines) -> None:
    active = 0
    peak = 0
    two_in_flight = asyncio.Event()

    async def model(prompt: str) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 2:
            two_in_flight.set()
        try:
            # Every call waits until two overlap: with a limit of 1 the run
            # would never finish (and fail the wait below).
            await asyncio.wait_for(two_in_flight.wait(), LIVENESS)
            await asyncio.sleep(0.01)  # let the others try to get in
        finally:
            active -= 1
        return prompt

    flow = await engines(CallablePromptBackend(model, max_concurrency=2))

    @flow.prompt_task(backend="llm")
    async def ask(n: int) -> str:
        return f"prompt {n}"

    answers = await asyncio.gather(*(ask(n) for n in range(8)))
    assert answers == [f"prompt {n}" for n in range(8)]
    assert peak == 2


async def test_cancelling_a_prompt_task_cancels_the_call(engines) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_model(prompt: str) -> str:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return prompt

    flow = await engines(CallablePromptBackend(slow_model))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "anything"

    future = ask()
    await asyncio.wait_for(entered.wait(), LIVENESS)
    assert future.cancel()
    await asyncio.wait_for(cancelled.wait(), LIVENESS)
    with pytest.raises(asyncio.CancelledError):
        await future


async def test_a_callable_raising_cancelled_error_fails_its_task(engines) -> None:
    async def confused(prompt: str) -> str:
        raise asyncio.CancelledError

    flow = await engines(CallablePromptBackend(confused))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(RuntimeError, match="CancelledError of its own"):
        await ask()


async def test_a_checkpoint_keys_prompts_by_their_settings_too(
    tmp_path: Path,
) -> None:
    calls: list[str] = []

    async def model(prompt: str, task_description: dict[str, Any]) -> str:
        calls.append(task_description["system"])
        return f"{task_description['system']}: {prompt}"

    async def run(system: str) -> str:
        flow = await WorkflowEngine.create(
            backend=[AsyncioExecutionBackend(), CallablePromptBackend(model)],
            checkpoint=tmp_path / "run.sqlite",
        )
        try:

            @flow.prompt_task(backend="llm")
            def ask(question: str) -> str:
                return question

            return str(await ask("hello", task_description={"system": system}))
        finally:
            await flow.shutdown()

    assert await run("pirate") == "pirate: hello"
    assert await run("pirate") == "pirate: hello"  # from the checkpoint
    assert calls == ["pirate"]
    assert await run("poet") == "poet: hello"  # another system prompt: asked
    assert calls == ["pirate", "poet"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="needs a callable"):
        CallablePromptBackend("not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_concurrency"):
        CallablePromptBackend(str, max_concurrency=0)
    with pytest.raises(ValueError, match="needs a model"):
        OpenAIChatBackend(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAIChatBackend(base_url="ftp://example/v1", model="m")
    with pytest.raises(ValueError, match="unknown key"):
        OpenAIChatBackend(model="m", defaults={"temprature": 0.5})
    with pytest.raises(ValueError, match="timeout"):
        OpenAIChatBackend(model="m", timeout=0)


# -- OpenAIChatBackend: requests and replies --------------------------------


async def test_prompt_system_prompt_and_sampling_reach_the_server(
    chat_server, engines
) -> None:
    server, url = await chat_server([completion("an answer")])
    responses: list[dict[str, Any]] = []
    backend = chat_backend(
        url,
        system="You are terse.",
        defaults={"temperature": 0.1, "max_tokens": 64},
        headers={"X-Team": "physics"},
        on_response=lambda task, data: responses.append(data),
    )
    flow = await engines(backend)

    @flow.function_task
    def topic() -> str:
        return "argon"

    @flow.prompt_task(backend="llm")
    async def ask(subject: str, task_description={"temperature": 0.7}) -> str:  # noqa: B006
        return f"Describe {subject}."

    first = await ask(topic())
    second = await ask(
        "neon",
        task_description={
            "system": "You are a chemist.",
            "model": "other-model",
            "seed": 3,
            "messages": [{"role": "user", "content": "Hi"}],
            "extra_body": {"top_k": 5},
        },
    )
    assert first == second == "an answer"
    assert len(server.requests) == 2
    one, two = server.requests
    assert one.path == "/v1/chat/completions"
    assert one.headers["authorization"] == f"Bearer {KEY}"
    assert one.headers["x-team"] == "physics"
    assert one.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Describe argon."},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
        "stream": False,
    }
    assert two.body == {
        "model": "other-model",
        "messages": [
            {"role": "system", "content": "You are a chemist."},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "Describe neon."},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
        "seed": 3,
        "top_k": 5,
        "stream": False,
    }
    assert [r["choices"][0]["finish_reason"] for r in responses] == ["stop", "stop"]
    assert backend.usage == {
        "prompt_tokens": 14,
        "completion_tokens": 6,
        "total_tokens": 20,
    }


async def test_configuration_comes_from_the_environment(
    chat_server, engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = await chat_server([completion("from env")])
    monkeypatch.setenv("OPENAI_BASE_URL", url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    backend = OpenAIChatBackend()
    assert backend.url == url + "/chat/completions"
    flow = await engines(backend)

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    assert await ask() == "from env"
    assert server.requests[0].body["model"] == "env-model"
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_no_key_sends_no_authorization_header(chat_server, engines) -> None:
    server, url = await chat_server([completion("local")])
    flow = await engines(chat_backend(url, api_key=""))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    assert await ask() == "local"
    assert "authorization" not in server.requests[0].headers


async def test_an_unknown_description_key_fails_the_task(chat_server, engines) -> None:
    server, url = await chat_server([completion("never")])
    flow = await engines(chat_backend(url))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ValueError, match=r"unknown key.*'temprature'"):
        await ask(task_description={"temprature": 0.2})
    assert server.requests == []


# -- retries ------------------------------------------------------------------


async def test_429_waits_as_retry_after_says_then_succeeds(
    chat_server, engines
) -> None:
    server, url = await chat_server(
        [api_error(429, "slow down", {"Retry-After": "1"}), completion("done")]
    )
    flow = await engines(chat_backend(url, max_retries=1))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    assert await ask() == "done"
    first, second = server.requests
    # The backoff alone would have waited about 10ms.
    assert second.at - first.at >= 0.95


async def test_retry_after_as_an_http_date_is_honoured(chat_server, engines) -> None:
    not_before: list[float] = []

    def script(n: int, _: Seen) -> Reply:
        if n == 0:
            when = math.ceil(time.time()) + 1.0
            not_before.append(when)
            date = email.utils.formatdate(when, usegmt=True)
            return api_error(503, "warming up", {"Retry-After": date})
        return completion("warm")

    server, url = await chat_server(script)
    flow = await engines(chat_backend(url, max_retries=1))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    assert await ask() == "warm"
    assert len(server.requests) == 2
    assert server.requests[1].at >= not_before[0] - 0.05


class RetryNoted(logging.Handler):
    """Sets ``event`` once the backend logs that it will retry."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__(logging.DEBUG)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" in record.getMessage():
            self.event.set()


async def test_a_429_holds_back_the_other_requests_too(chat_server, engines) -> None:
    def script(n: int, _: Seen) -> Reply:
        if n == 0:
            return api_error(429, "slow down", {"retry-after-ms": "800"})
        return completion("ok")

    server, url = await chat_server(script)
    flow = await engines(chat_backend(url, max_retries=1, max_concurrency=None))

    @flow.prompt_task(backend="llm")
    async def ask(n: int) -> str:
        return f"hi {n}"

    noted = asyncio.Event()
    handler = RetryNoted(noted)
    logger = logging.getLogger("asyncflow.backends.prompt")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        first_call = ask(1)
        await asyncio.wait_for(noted.wait(), LIVENESS)  # the 429 is in
        second_call = ask(2)  # a fresh task, in no slot and no retry of its own
        assert await asyncio.gather(first_call, second_call) == ["ok", "ok"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    first, *rest = server.requests
    assert len(rest) == 2
    assert all(later.at - first.at >= 0.75 for later in rest)


async def test_a_500_is_retried_then_succeeds(chat_server, engines) -> None:
    server, url = await chat_server(
        [api_error(500, "overloaded"), completion("second time lucky")]
    )
    flow = await engines(chat_backend(url, max_retries=2))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    assert await ask() == "second time lucky"
    assert len(server.requests) == 2


async def test_500_past_max_retries_fails_with_status_message_and_attempts(
    chat_server, engines
) -> None:
    server, url = await chat_server([api_error(500, "the GPU caught fire")])
    flow = await engines(chat_backend(url, max_retries=2))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatServerError) as caught:
        await ask()
    error = caught.value
    assert len(server.requests) == 3
    assert error.status == 500
    assert error.attempts == 3
    assert error.server_message == "the GPU caught fire"
    assert "after 3 attempts" in str(error)
    assert "HTTP 500 Internal Server Error" in str(error)
    assert "the GPU caught fire" in str(error)
    assert isinstance(error, ChatHTTPError)
    assert isinstance(error, ChatCompletionError)
    assert isinstance(error, PromptBackendError)
    assert isinstance(error, AsyncFlowError)


async def test_a_client_error_is_not_retried(chat_server, engines) -> None:
    server, url = await chat_server([api_error(400, "bad temperature")])
    flow = await engines(chat_backend(url, max_retries=3))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatHTTPError, match=r"HTTP 400 .*bad temperature") as caught:
        await ask()
    assert caught.value.attempts == 1
    assert len(server.requests) == 1


async def test_a_retry_after_beyond_the_cap_fails_at_once(chat_server, engines) -> None:
    server, url = await chat_server(
        [api_error(429, "quota", {"Retry-After": "3600"}), completion("never")]
    )
    flow = await engines(chat_backend(url, max_retries=3, max_retry_after=30))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatRateLimitError, match="retry after 3600s") as caught:
        await ask()
    assert caught.value.status == 429
    assert len(server.requests) == 1


async def test_a_slow_reply_times_out_on_every_attempt(chat_server, engines) -> None:
    server, url = await chat_server([HANG])
    flow = await engines(chat_backend(url, timeout=0.3, max_retries=1))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatTimeoutError, match=r"no reply within 0\.3s") as caught:
        await ask()
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.attempts == 2
    assert caught.value.status is None
    assert len(server.requests) == 2


async def test_malformed_json_fails_without_a_retry(chat_server, engines) -> None:
    server, url = await chat_server([(200, {}, b'{"choices": [oops')])
    flow = await engines(chat_backend(url, max_retries=3))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatResponseError, match="not JSON") as caught:
        await ask()
    assert caught.value.attempts == 1
    assert len(server.requests) == 1


async def test_a_reply_without_content_fails(chat_server, engines) -> None:
    _, url = await chat_server([(200, {}, json.dumps({"choices": []}).encode())])
    flow = await engines(chat_backend(url))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatResponseError, match=r"no choices\[0\]\.message\.content"):
        await ask()


async def test_an_unreachable_server_is_a_connection_error(engines) -> None:
    # A port just bound and released: nothing listens there.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flow = await engines(chat_backend(f"http://127.0.0.1:{port}/v1", max_retries=1))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    with pytest.raises(ChatConnectionError, match="after 2 attempts") as caught:
        await ask()
    assert isinstance(caught.value, ConnectionError)
    assert caught.value.attempts == 2


# -- limits ---------------------------------------------------------------------


async def test_requests_per_minute_spaces_the_requests(chat_server, engines) -> None:
    server, url = await chat_server([completion("paced")])
    # 300 per minute: one request every 0.2 s at most.
    flow = await engines(chat_backend(url, requests_per_minute=300))

    @flow.prompt_task(backend="llm")
    async def ask(n: int) -> str:
        return f"hi {n}"

    assert await asyncio.gather(*(ask(n) for n in range(4))) == ["paced"] * 4
    times = sorted(request.at for request in server.requests)
    assert len(times) == 4
    # Four starts 0.2 s apart span at least 0.6 s (some slack for delivery).
    assert times[-1] - times[0] >= 0.5


async def test_max_concurrency_bounds_the_requests_in_flight(
    chat_server, engines
) -> None:
    server, url = await chat_server([HANG])
    flow = await engines(chat_backend(url, max_concurrency=2, timeout=600))

    @flow.prompt_task(backend="llm")
    async def ask(n: int) -> str:
        return f"hi {n}"

    futures = [ask(n) for n in range(5)]
    await server.wait_for_requests(2)
    # Give the other three every chance to get through (they must not).
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert len(server.requests) == 2
    futures[0].cancel()  # frees a slot: exactly one more request comes
    await server.wait_for_requests(3)
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert len(server.requests) == 3
    for future in futures:
        future.cancel()
    for future in futures:
        with pytest.raises(asyncio.CancelledError):
            await future


# -- cancellation and shutdown ----------------------------------------------------


async def test_cancelling_a_task_cancels_its_request(chat_server, engines) -> None:
    server, url = await chat_server([HANG])
    flow = await engines(chat_backend(url))

    @flow.prompt_task(backend="llm")
    async def ask() -> str:
        return "hi"

    future = ask()
    await server.wait_for_requests(1)
    assert future.cancel()
    await asyncio.wait_for(server.disconnected.wait(), LIVENESS)
    with pytest.raises(asyncio.CancelledError):
        await future


async def test_a_task_timeout_stops_the_request(chat_server, engines) -> None:
    server, url = await chat_server([HANG])
    flow = await engines(chat_backend(url))

    @flow.prompt_task(backend="llm", timeout=0.3)
    async def ask() -> str:
        return "hi"

    with pytest.raises(TaskTimeoutError):
        await ask()
    await asyncio.wait_for(server.disconnected.wait(), LIVENESS)


async def test_shutdown_closes_the_client(chat_server) -> None:
    server, url = await chat_server([completion("bye")])
    flow = await WorkflowEngine.create(
        backend=[AsyncioExecutionBackend(), chat_backend(url)]
    )
    try:

        @flow.prompt_task(backend="llm")
        async def ask() -> str:
            return "hi"

        assert await ask() == "bye"
        assert server.closed_by_client == 0  # kept alive for the next request
    finally:
        await flow.shutdown()

    async def closed() -> None:
        while server.closed_by_client < 1:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(closed(), LIVENESS)


# -- the key never leaks -------------------------------------------------------------


class Everything(logging.Handler):
    """Every record of every logger, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def every_log_record() -> Iterator[Everything]:
    handler = Everything()
    names = ["", "asyncflow", "httpx", "httpcore", *logging.root.manager.loggerDict]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    logging.getLogger("asyncflow").addHandler(handler)  # propagate or not
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger("asyncflow").removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def test_the_key_never_appears_anywhere(
    chat_server, engines, every_log_record: Everything, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    quoted = f"Incorrect API key provided: {KEY}. Bearer {KEY} is not valid."

    def script(n: int, request: Seen) -> Reply:
        prompt = request.body["messages"][-1]["content"]
        if prompt == "unauthorised":
            return api_error(401, quoted)
        if prompt == "flaky":
            return api_error(503, quoted, {"Retry-After": "0"})
        if prompt == "garbled":
            return 200, {}, f"<html>{KEY}</html>".encode()
        return completion(f"fine, and the server said {len(KEY)} characters")

    server, url = await chat_server(script)
    backend = chat_backend(url, max_retries=1)
    trace = tmp_path / "trace.jsonl"
    flow = await engines(backend, trace=trace)
    events: list[TaskEvent] = []
    flow.subscribe(events.append)
    exporter = InMemorySpanExporter()
    await flow.start_telemetry(span_processors=[SimpleSpanProcessor(exporter)])

    @flow.prompt_task(backend="llm")
    async def ask(prompt: str) -> str:
        return prompt

    @flow.function_task
    def use(answer: str) -> str:
        return answer

    assert (await ask("hello")).startswith("fine")
    errors: list[BaseException] = []
    for prompt, kind in (
        ("unauthorised", ChatAuthenticationError),
        ("flaky", ChatServerError),
        ("garbled", ChatResponseError),
    ):
        with pytest.raises(kind) as caught:
            await ask(prompt)
        errors.append(caught.value)
        with pytest.raises(DependencyFailureError) as downstream:
            await use(ask(prompt))
        errors.append(downstream.value)
    assert len(server.requests) == 1 + 2 * (1 + 2 + 1)
    await flow.shutdown()

    texts = [
        repr(backend),
        str(vars(backend)),
        *every_log_record.lines,
        trace.read_text(encoding="utf-8"),
        *(repr(event) for event in events),
        *(str(event.error) for event in events),
        *(span.to_json() for span in exporter.get_finished_spans()),
    ]
    for error in errors:
        texts += [str(error), repr(error), repr(error.args), repr(vars(error))]
        cause = error.__cause__
        if cause is not None:
            texts += [str(cause), repr(cause), repr(vars(cause))]
    leaks = [text for text in texts if KEY in text]
    assert not leaks
    # The messages still carry what the server said, with the key masked.
    auth = errors[0]
    assert isinstance(auth, ChatAuthenticationError)
    assert auth.status == 401
    assert auth.server_message == (
        "Incorrect API key provided: ***. Bearer *** is not valid."
    )
    assert "HTTP 401 Unauthorized" in str(auth)
    # ... and the logs were really captured, at DEBUG, from the HTTP client too.
    assert any(line.startswith("asyncflow.backends.prompt DEBUG") for line in texts)
    assert any(line.startswith("httpcore") for line in every_log_record.lines)
    assert any(event.kind == "failed" for event in events)


# -- packaging -------------------------------------------------------------------


def test_importing_asyncflow_does_not_import_httpx() -> None:
    code = textwrap.dedent(
        """
        import sys
        import asyncflow
        assert "httpx" not in sys.modules
        asyncflow.CallablePromptBackend, asyncflow.OpenAIChatBackend
        assert "httpx" not in sys.modules, "the prompt module imported httpx"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=LIVENESS * 3,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_without_httpx_the_error_says_what_to_install() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["httpx"] = None  # as if it were not installed
        from asyncflow import OpenAIChatBackend
        try:
            OpenAIChatBackend(model="m")
        except ImportError as error:
            print(error)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=LIVENESS * 3,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'asyncflow-workflows[openai]'" in done.stdout
