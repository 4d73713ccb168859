"""Backends that answer prompt tasks for real.

:class:`CallablePromptBackend` hands each prompt to a function of yours, so
that any model SDK plugs in. :class:`OpenAIChatBackend` speaks the
OpenAI-compatible chat-completions HTTP API (``POST {base_url}/chat/completions``)
that OpenAI, vLLM, llama.cpp's server, Ollama and many hosted services serve;
it needs the optional extra ``openai`` (httpx).

Both run prompt tasks only: the task's body returns the prompt (a string),
the backend sends it and the reply's text becomes the task's result.
Per-task settings (system prompt, sampling parameters, model) travel in the
task's ``task_description``; see ``docs/prompt-backends.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import inspect
import json
import logging
import math
import os
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timezone
from typing import TYPE_CHECKING, Any

from ..errors import AsyncFlowError
from ..tasks import TaskFuture, TaskKind
from ._pool import DaemonThreadPool
from .base import ExecutionBackend, TaskReporter, cancelled_itself, log_started

if TYPE_CHECKING:
    import httpx

__all__ = [
    "PROMPT_KEYS",
    "CallablePromptBackend",
    "ChatAuthenticationError",
    "ChatCompletionError",
    "ChatConnectionError",
    "ChatHTTPError",
    "ChatRateLimitError",
    "ChatResponseError",
    "ChatServerError",
    "ChatTimeoutError",
    "OpenAIChatBackend",
    "PromptBackendError",
]

log = logging.getLogger("asyncflow.backends.prompt")

#: Where ``OpenAIChatBackend`` goes when neither ``base_url=`` nor
#: ``OPENAI_BASE_URL`` says otherwise (as the OpenAI client does).
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: The environment variable that names the default model.
MODEL_ENV = "OPENAI_MODEL"

#: Request parameters a task description (or ``defaults=``) may set; they go
#: into the request body as they are.
SAMPLING_KEYS = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "presence_penalty",
        "response_format",
        "seed",
        "stop",
        "temperature",
        "top_logprobs",
        "top_p",
        "user",
    }
)
#: Every key :class:`OpenAIChatBackend` reads from a task description.
PROMPT_KEYS = SAMPLING_KEYS | {"extra_body", "messages", "model", "system"}

#: HTTP statuses worth another attempt: request timeout, rate limit, and
#: every server error.
_RETRY_STATUSES = frozenset({408, 429})
_MESSAGE_LIMIT = 500  # characters of a server's error text kept in a message
_MASK = "***"

_INSTALL_HINT = "pip install 'asyncflow-workflows[openai]'"


# -- errors -------------------------------------------------------------------


class PromptBackendError(AsyncFlowError):
    """Base class of the errors the prompt backends raise on their own."""


class ChatCompletionError(PromptBackendError):
    """A chat-completion request failed.

    ``url`` is the endpoint, ``attempts`` the number of requests sent for the
    task (retries included), ``status`` the last HTTP status (``None`` when
    no reply came), ``server_message`` the server's own error text, if any.
    None of them, nor the message, ever contains the API key.
    """

    def __init__(
        self,
        message: str,
        url: str = "",
        attempts: int = 1,
        status: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status
        self.server_message = server_message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (str(self), self.url, self.attempts, self.status, self.server_message),
        )


class ChatHTTPError(ChatCompletionError):
    """The server answered with an HTTP error status (``status``)."""


class ChatAuthenticationError(ChatHTTPError):
    """HTTP 401 or 403: the API key is missing, wrong or not allowed."""


class ChatRateLimitError(ChatHTTPError):
    """HTTP 429 on every attempt: the server's rate limit or quota."""


class ChatServerError(ChatHTTPError):
    """HTTP 5xx on every attempt: the server failed."""


class ChatTimeoutError(ChatCompletionError, TimeoutError):
    """No complete reply within ``timeout`` seconds, on every attempt."""


class ChatConnectionError(ChatCompletionError, ConnectionError):
    """The server could not be reached, or dropped the connection."""


class ChatResponseError(ChatCompletionError):
    """A successful status, but a reply that is not a chat completion
    (not JSON, or without ``choices[0].message.content``)."""


# -- the shared machinery ---------------------------------------------------


class _PromptBackend(ExecutionBackend):
    """Runs each prompt task as an asyncio task on the engine's loop, at most
    ``max_concurrency`` at once; subclasses say how a prompt is answered."""

    kinds = frozenset({TaskKind.PROMPT})
    reports_start = True

    def __init__(self, name: str, max_concurrency: int | None) -> None:
        super().__init__(name)
        if max_concurrency is not None and (
            not isinstance(max_concurrency, int)
            or isinstance(max_concurrency, bool)
            or max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency must be an int >= 1 or None, got {max_concurrency!r}"
            )
        #: The most prompts answered at once (``None``: no limit).
        self.max_concurrency = max_concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._jobs: dict[TaskFuture, asyncio.Task[Any]] = {}
        self._stopped: set[asyncio.Task[Any]] = set()  # jobs we cancelled
        self._closing = False

    async def attach(self, reporter: TaskReporter) -> None:
        await super().attach(reporter)
        self._loop = asyncio.get_running_loop()
        if self.max_concurrency is not None:
            self._slots = asyncio.Semaphore(self.max_concurrency)

    def submit(self, tasks: Sequence[TaskFuture]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError(
                f"backend {self.name!r} is not attached to a WorkflowEngine"
            )
        for task in tasks:
            self._jobs[task] = loop.create_task(self._run(task, task.attempts))

    async def _run(self, task: TaskFuture, attempt: int) -> None:
        reporter = self.reporter
        job = asyncio.current_task()
        slot: Any = self._slots if self._slots is not None else contextlib.nullcontext()
        try:
            async with slot:
                value = await self._answer(task, attempt)
        except asyncio.CancelledError:
            if (
                job not in self._stopped
                and not self._closing
                and task.attempts == attempt
            ):
                # Not a cancel of ours: the user's code raised it itself.
                reporter.failed(task, cancelled_itself(task, "answering prompt task"))
            return
        except BaseException as exc:  # SystemExit & co. fail only this task
            if task.attempts == attempt:
                reporter.failed(task, exc)
        else:
            if task.attempts == attempt:
                reporter.succeeded(task, value)
        finally:
            if job is not None:
                self._stopped.discard(job)
            if self._jobs.get(task) is job:
                del self._jobs[task]

    def _begin(self, task: TaskFuture, attempt: int) -> None:
        """The attempt's work starts now (its slot and pace are granted)."""
        log_started(task, f" on prompt backend {self.name!r}")
        self.reporter.started(task, attempt)

    async def _answer(self, task: TaskFuture, attempt: int) -> str:
        raise NotImplementedError

    def cancel(self, task: TaskFuture) -> None:
        """Cancel the asyncio task answering ``task`` (its request with it)."""
        job = self._jobs.get(task)
        if job is not None:
            self._stopped.add(job)
            job.cancel()

    def kill(self) -> None:
        for job in list(self._jobs.values()):
            self._stopped.add(job)
            job.cancel()

    async def shutdown(self) -> None:
        """Cancel every prompt still being answered, then release resources."""
        self._closing = True
        jobs = list(self._jobs.values())
        for job in jobs:
            self._stopped.add(job)
            job.cancel()
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
        await self._release()

    async def _release(self) -> None:
        """Free what the backend holds (clients, threads)."""


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _takes_description(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("task_description")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


class CallablePromptBackend(_PromptBackend):
    """Answers each prompt task by calling ``fn(prompt)``.

    ``fn`` is an ``async def`` function (or any callable returning an
    awaitable) that takes the prompt string and returns the answer string,
    so any model SDK plugs in. A plain ``def`` function runs in a thread of
    the backend's own (daemon threads, at most ``max_concurrency``), so that
    a blocking client does not stall the event loop. When ``fn`` has a
    parameter named ``task_description``, it also receives a copy of the
    task's description (system prompt, sampling settings: whatever your
    tasks put there).

    At most ``max_concurrency`` prompts are answered at once (``None``: no
    limit); a task's ``started`` event and its ``timeout`` begin when its
    call does. An exception raised by ``fn`` fails the task as it is; an
    answer that is not a ``str`` fails it with ``TypeError``. Cancelling a
    task cancels its call (a call running in a thread cannot be stopped:
    the backend stops waiting for it).
    """

    def __init__(
        self,
        fn: Callable[..., Awaitable[str] | str],
        *,
        name: str = "llm",
        max_concurrency: int | None = 16,
    ) -> None:
        if not callable(fn):
            raise TypeError(
                f"CallablePromptBackend needs a callable prompt -> str, got "
                f"{type(fn).__name__}"
            )
        super().__init__(name, max_concurrency)
        self.fn = fn
        self._is_async = _is_async_callable(fn)
        self._pass_description = _takes_description(fn)
        self._threads: DaemonThreadPool | None = None

    async def _answer(self, task: TaskFuture, attempt: int) -> str:
        self._begin(task, attempt)
        kwargs: dict[str, Any] = {}
        if self._pass_description:
            kwargs["task_description"] = dict(task.task_description)
        if self._is_async:
            answer: Any = self.fn(task.command, **kwargs)
        else:
            if self._threads is None:
                self._threads = DaemonThreadPool(
                    self.max_concurrency, thread_name_prefix=f"asyncflow-{self.name}"
                )
            call = self._threads.submit(self.fn, task.command, **kwargs)
            answer = await asyncio.wrap_future(call)
        if inspect.isawaitable(answer):
            answer = await answer
        if not isinstance(answer, str):
            raise TypeError(
                f"prompt backend {self.name!r}: {_callable_name(self.fn)} returned "
                f"{type(answer).__name__} for prompt task {task.name!r} "
                f"({task.uid}); it must return the answer as a str"
            )
        return answer

    async def _release(self) -> None:
        if self._threads is not None:
            # Daemon threads: one stuck in a blocking call is left behind and
            # does not keep the program from exiting.
            self._threads.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"<CallablePromptBackend {self.name!r} fn={_callable_name(self.fn)}>"


def _callable_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return str(name)


# -- OpenAI-compatible chat completions -----------------------------------------


class _Secret:
    """Holds the API key; its repr never shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(_MASK) if self.value else "''"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("the API key is not picklable")


class _Pacer:
    """Spaces request starts at least ``60 / per_minute`` seconds apart, in
    arrival order, and holds every start while the server asked to wait."""

    def __init__(self, per_minute: float | None) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = -math.inf
        self._paused_until = -math.inf
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def wait(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                start = max(self._next, self._paused_until)
                if start <= now:
                    break
                await asyncio.sleep(start - now)
            self._next = now + self.interval


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise ImportError(
            f"OpenAIChatBackend needs the httpx package: {_INSTALL_HINT}"
        ) from exc
    return httpx


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_prompt_settings(settings: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError``/``TypeError`` for settings the backend cannot send."""
    unknown = sorted(str(k) for k in settings if k not in PROMPT_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"the keys are {', '.join(sorted(PROMPT_KEYS))} (put anything else "
            "the server takes in 'extra_body')"
        )
    system = settings.get("system")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"{where}: 'system' must be a str or None, got {system!r}")
    model = settings.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise TypeError(f"{where}: 'model' must be a non-empty str, got {model!r}")
    messages = settings.get("messages")
    if messages is not None and (
        not isinstance(messages, (list, tuple))
        or not all(isinstance(m, Mapping) and "role" in m for m in messages)
    ):
        raise TypeError(
            f"{where}: 'messages' must be a list of chat messages (dicts with "
            f"'role' and 'content'), got {messages!r}"
        )
    extra = settings.get("extra_body")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(
                f"{where}: 'extra_body' must be a dict, got {type(extra).__name__}"
            )
        if extra.get("stream"):
            raise ValueError(
                f"{where}: streaming is not supported ('stream' in 'extra_body')"
            )


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds a ``Retry-After`` (or ``retry-after-ms``) header asks to wait."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    text = headers.get("retry-after")
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _server_message(response: httpx.Response) -> str:
    """The error text of a reply: the API's ``error.message`` when present."""
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
    else:
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return str(error["message"])[:_MESSAGE_LIMIT]
            if isinstance(error, str):
                return error[:_MESSAGE_LIMIT]
            for key in ("message", "detail"):
                if isinstance(data.get(key), str):
                    return str(data[key])[:_MESSAGE_LIMIT]
        text = json.dumps(data)
    if len(text) > _MESSAGE_LIMIT:
        text = text[:_MESSAGE_LIMIT] + "..."
    return text


def _reply_text(data: Any) -> tuple[str | None, str | None]:
    """``(text, finish_reason)`` of a chat completion; text None if absent."""
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, None
    reason = choice.get("finish_reason") if isinstance(choice, dict) else None
    if isinstance(content, list):  # content parts: keep the text ones
        parts = [
            str(p["text"])
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        content = "".join(parts) if parts else None
    if not isinstance(content, str):
        return None, reason if isinstance(reason, str) else None
    return content, reason if isinstance(reason, str) else None


class OpenAIChatBackend(_PromptBackend):
    """Answers prompt tasks with an OpenAI-compatible chat-completions API.

    Each prompt is sent as ``POST {base_url}/chat/completions`` (streaming
    off); the result is the reply's text, ``choices[0].message.content``.
    ``base_url`` ends in ``/v1`` as the OpenAI client takes it (default:
    ``OPENAI_BASE_URL``, else ``https://api.openai.com/v1``); ``model``
    defaults to ``OPENAI_MODEL``; ``api_key`` to ``OPENAI_API_KEY`` (an empty
    key, or none, sends no ``Authorization`` header, as local servers want).

    Per-task settings come from the task's ``task_description``, over the
    backend's ``defaults`` (``system=`` is a shortcut for
    ``defaults["system"]``): ``system`` (the system prompt), ``messages``
    (earlier turns, placed before the prompt), ``model``, the sampling
    parameters of :data:`SAMPLING_KEYS` (``temperature``, ``max_tokens``,
    ``top_p``, ``stop``, ``seed``, ...), and ``extra_body`` (a dict merged
    into the request body, for server-specific parameters). Other keys fail
    the task with ``ValueError``.

    ``timeout`` bounds each request (seconds, from sending it to the end of
    the reply). A request that times out, cannot connect, or gets HTTP 408,
    429 or 5xx is sent again, up to ``max_retries`` more times: after the
    wait the server's ``Retry-After`` (or ``retry-after-ms``) asks for, at
    most ``max_retry_after`` seconds (a longer wait fails the task at
    once), otherwise after an exponential backoff from ``retry_delay``
    seconds, doubled each time up to ``max_retry_delay``, with jitter. A 429
    with ``Retry-After`` holds back every request of this backend, not only
    the one that got it. Other errors are not retried.

    At most ``max_concurrency`` requests are in flight (``None``: no limit),
    and with ``requests_per_minute`` request starts (retries included) are
    spaced at least ``60 / requests_per_minute`` seconds apart. Failures
    raise subclasses of :class:`ChatCompletionError` naming the status, the
    server's message and the number of attempts. The API key is never
    written to logs, messages or reprs: any text the backend passes on (a
    server's error body included) has it replaced by ``***``.

    ``on_response(task, response)``, if given, is called on the event loop
    with each successful reply's parsed JSON (``usage``, ``finish_reason``,
    ``model``, ...); :attr:`usage` sums the token counts of all replies.
    Cancelling a task cancels its request; :meth:`shutdown` closes the
    HTTP client.
    """

    def __init__(
        self,
        *,
        name: str = "llm",
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
        max_concurrency: int | None = 16,
        requests_per_minute: float | None = None,
        system: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry_delay: float = 0.5,
        max_retry_delay: float = 8.0,
        max_retry_after: float = 60.0,
        on_response: Callable[[TaskFuture, dict[str, Any]], None] | None = None,
    ) -> None:
        self._httpx = _import_httpx()
        super().__init__(name, max_concurrency)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if not isinstance(key, str):
            raise TypeError(f"api_key must be a str, got {type(key).__name__}")
        self._key = _Secret(key.strip())
        url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in (
            "http",
            "https",
        ):
            raise ValueError(
                "base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                f"got {self._scrub(str(url))!r}"
            )
        #: The API root, ending in ``/v1`` (no trailing slash).
        self.base_url = url.rstrip("/")
        #: The chat-completions endpoint every request goes to.
        self.url = self.base_url + "/chat/completions"
        chosen = model or os.environ.get(MODEL_ENV)
        if not chosen or not isinstance(chosen, str):
            raise ValueError(
                f"OpenAIChatBackend needs a model: pass model=... or set {MODEL_ENV}"
            )
        #: The model of tasks whose description names none.
        self.model = chosen
        _positive("timeout", timeout)
        if (
            not isinstance(max_retries, int)
            or isinstance(max_retries, bool)
            or max_retries < 0
        ):
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        _positive("requests_per_minute", requests_per_minute, allow_none=True)
        for label, value in (
            ("retry_delay", retry_delay),
            ("max_retry_delay", max_retry_delay),
            ("max_retry_after", max_retry_after),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value >= 0
            ):
                raise ValueError(f"{label} must be a number >= 0, got {value!r}")
        settings = dict(defaults or {})
        if system is not None:
            settings["system"] = system
        _check_prompt_settings(settings, "OpenAIChatBackend defaults")
        if on_response is not None and not callable(on_response):
            raise TypeError("on_response must be a callable (task, response)")
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.requests_per_minute = requests_per_minute
        self.retry_delay = float(retry_delay)
        self.max_retry_delay = float(max_retry_delay)
        self.max_retry_after = float(max_retry_after)
        #: Settings of every task, under its own ``task_description``.
        self.defaults: dict[str, Any] = settings
        self.on_response = on_response
        self._headers = {str(k): str(v) for k, v in (headers or {}).items()}
        #: Token counts summed over every successful reply.
        self.usage: dict[str, int] = {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        }
        self._client: httpx.AsyncClient | None = None
        self._pacer: _Pacer | None = None

    async def attach(self, reporter: TaskReporter) -> None:
        await super().attach(reporter)
        httpx = self._httpx
        limit = self.max_concurrency
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            follow_redirects=False,
        )
        self._pacer = _Pacer(self.requests_per_minute)

    # -- the key never leaves -------------------------------------------------

    def _scrub(self, text: str) -> str:
        """``text`` with every spelling of the API key replaced by ``***``."""
        key = self._key.value
        if not key:
            return text
        for form in {key, urllib.parse.quote(key, safe=""), json.dumps(key)[1:-1]}:
            text = text.replace(form, _MASK)
        return text

    # -- one task -------------------------------------------------------------

    def _request_body(self, task: TaskFuture) -> dict[str, Any]:
        description = task.task_description
        _check_prompt_settings(
            description, f"task_description of prompt task {task.name!r}"
        )
        settings = {**self.defaults, **description}
        messages: list[Any] = []
        system = settings.get("system")
        if system:
            messages.append({"role": "system", "content": system})
        messages.extend(dict(m) for m in settings.get("messages") or ())
        messages.append({"role": "user", "content": task.command})
        body: dict[str, Any] = {
            "model": settings.get("model") or self.model,
            "messages": messages,
        }
        for key in sorted(SAMPLING_KEYS):
            if settings.get(key) is not None:
                body[key] = settings[key]
        body.update(settings.get("extra_body") or {})
        body["stream"] = False
        return body

    def _backoff(self, retry: int) -> float:
        delay = min(self.max_retry_delay, self.retry_delay * 2.0 ** (retry - 1))
        return delay * random.uniform(0.75, 1.0)

    async def _answer(self, task: TaskFuture, attempt: int) -> str:
        body = self._request_body(task)
        client, pacer = self._client, self._pacer
        if client is None or pacer is None:
            raise RuntimeError(
                f"backend {self.name!r} is not attached to a WorkflowEngine"
            )
        httpx = self._httpx
        headers = dict(self._headers)
        if self._key.value:
            headers["Authorization"] = f"Bearer {self._key.value}"
        url = self.url
        tries = 0
        while True:
            await pacer.wait()
            if tries == 0:
                self._begin(task, attempt)
            tries += 1
            log.debug(
                "prompt task %s: POST %s (model %s, request %d of at most %d)",
                task.uid,
                self._scrub(url),
                body["model"],
                tries,
                self.max_retries + 1,
            )
            retry_after: float | None = None
            try:
                response = await asyncio.wait_for(
                    client.post(url, json=body, headers=headers), self.timeout
                )
            except (asyncio.TimeoutError, httpx.TimeoutException):
                failure: ChatCompletionError = ChatTimeoutError(
                    self._describe(
                        task, tries, f"no reply within {self.timeout:g}s from {url}"
                    ),
                    self._scrub(url),
                    tries,
                )
                retryable = True
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
                failure = ChatConnectionError(
                    self._describe(
                        task, tries, f"{type(exc).__name__} talking to {url}: {reason}"
                    ),
                    self._scrub(url),
                    tries,
                )
                retryable = True
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._accept(task, response, tries)
                failure = self._http_error(task, response, tries)
                retryable = status in _RETRY_STATUSES or status >= 500
                retry_after = _retry_after(response.headers) if retryable else None
            if not retryable or tries > self.max_retries:
                raise failure from None
            if retry_after is not None:
                if retry_after > self.max_retry_after:
                    failure.args = (
                        f"{failure}; the server asked to retry after "
                        f"{retry_after:g}s, more than max_retry_after="
                        f"{self.max_retry_after:g}s",
                    )
                    raise failure from None
                delay = retry_after
                if failure.status == 429:
                    pacer.pause(delay)
                how = "as Retry-After asks"
            else:
                delay = self._backoff(tries)
                how = "backing off"
            log.debug(
                "prompt task %s: %s; retrying in %.3gs (%s)",
                task.uid,
                failure,
                delay,
                how,
            )
            await asyncio.sleep(delay)

    def _describe(self, task: TaskFuture, tries: int, what: str) -> str:
        plural = "" if tries == 1 else "s"
        return self._scrub(
            f"chat completion for prompt task {task.name!r} ({task.uid}) failed "
            f"after {tries} attempt{plural}: {what}"
        )

    def _http_error(
        self, task: TaskFuture, response: httpx.Response, tries: int
    ) -> ChatCompletionError:
        status = response.status_code
        server = self._scrub(_server_message(response))
        phrase = response.reason_phrase or ""
        what = f"HTTP {status}{' ' + phrase if phrase else ''} from {self.url}"
        if server:
            what += f": {server}"
        if status in (401, 403):
            kind: type[ChatHTTPError] = ChatAuthenticationError
        elif status == 429:
            kind = ChatRateLimitError
        elif status >= 500:
            kind = ChatServerError
        else:
            kind = ChatHTTPError
        return kind(
            self._describe(task, tries, what),
            self._scrub(self.url),
            tries,
            status,
            server or None,
        )

    def _accept(self, task: TaskFuture, response: httpx.Response, tries: int) -> str:
        try:
            data = response.json()
        except ValueError:
            snippet = response.text.strip()[:200]
            raise ChatResponseError(
                self._describe(
                    task,
                    tries,
                    f"HTTP {response.status_code} from {self.url} but the reply is "
                    f"not JSON: {snippet!r}",
                ),
                self._scrub(self.url),
                tries,
                response.status_code,
            ) from None
        text, reason = _reply_text(data)
        if text is None:
            server = _server_message(response) if isinstance(data, dict) else ""
            detail = f" (finish_reason {reason!r})" if reason else ""
            raise ChatResponseError(
                self._describe(
                    task,
                    tries,
                    f"the reply from {self.url} has no choices[0].message.content"
                    f"{detail}: {server}",
                ),
                self._scrub(self.url),
                tries,
                response.status_code,
                self._scrub(server) or None,
            )
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            for key in self.usage:
                count = usage.get(key)
                if isinstance(count, int) and not isinstance(count, bool):
                    self.usage[key] += count
        log.debug(
            "prompt task %s: answered after %d request(s), finish_reason %s, usage %s",
            task.uid,
            tries,
            reason,
            self._scrub(json.dumps(usage)) if usage is not None else None,
        )
        if self.on_response is not None:
            self.on_response(task, data)
        return text

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return self._scrub(
            f"<OpenAIChatBackend {self.name!r} model={self.model!r} "
            f"base_url={self.base_url!r}>"
        )
