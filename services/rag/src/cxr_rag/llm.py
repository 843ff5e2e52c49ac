"""Client for an OpenAI-compatible chat API (vLLM's `/v1/chat/completions`), plain and streaming.

- `timeout_s` is the budget of a whole call: queueing for the concurrency cap, every attempt,
  the backoff between them and, when streaming, the last token; a trickling server cannot stretch
  it (a per-read timeout alone would let one token per read keep a call alive for ever);
- retries with exponential backoff and jitter (tenacity) on connection errors, HTTP 429 and
  5xx — before the first token only, never mid-stream, and only when the backoff ends before the
  call's deadline (otherwise the last error is raised at once);
- a concurrency cap (requests in flight to the LLM at once);
- DeepSeek-R1 reasoning separated from the answer: `reasoning_content` deltas (vLLM's
  reasoning parser) or `<think>…</think>` in the text, including the R1 chat template that
  opens `<think>` in the prompt so the output only closes it;
- every failure becomes a domain error with a message naming the endpoint: unreachable ->
  DependencyUnavailableError (UNAVAILABLE), too slow -> DependencyTimeoutError
  (DEADLINE_EXCEEDED), HTTP errors and unparseable output -> DependencyUnavailableError.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from cxr_rag.config import LlmConfig
from cxr_serving.errors import CxrError, DependencyTimeoutError, DependencyUnavailableError

log = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Delta:
    """A piece of streamed output: kind is 'answer' or 'reasoning'."""

    kind: str
    text: str


@dataclass(frozen=True)
class Finish:
    reason: str


@dataclass(frozen=True)
class Completion:
    text: str
    reasoning: str
    finish_reason: str
    model: str


class ThinkSplitter:
    """Streaming separation of `<think>…</think>` reasoning from the answer.

    `think_open=True` means the prompt already opened the think block (DeepSeek-R1 template):
    text is reasoning until `</think>` (a leading `<think>` the model repeats anyway is dropped).
    Otherwise reasoning starts only with a leading `<think>`.
    Tags split across chunks are handled by holding back a possible partial tag.

    An output that never closes a think block: after a `<think>` the model wrote itself, the rest
    is reasoning and the answer is empty (it ran out of tokens while thinking). With the template's
    own open block and no tag at all, the model did not think: `finish()` gives the whole text
    once more as the answer (`fell_back`), so a stream ends with the answer a plain call returns.
    """

    def __init__(self, think_open: bool = False) -> None:
        self._in_think = think_open
        self._template_open = think_open
        self._saw_tag = False
        self._answered = False
        self._reasoning: list[str] = []
        self.fell_back = False
        self._started = False  # past the point where a leading <think> may appear (dropped in both modes)
        self._buf = ""
        self._strip_leading = False  # drop whitespace right after </think>

    def feed(self, text: str) -> list[Delta]:
        out = self._feed(text)
        for d in out:
            if d.kind == "answer":
                self._answered = True
            elif self._template_open and not self._saw_tag:
                self._reasoning.append(d.text)
        return out

    def _feed(self, text: str) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        while self._buf:
            if not self._started:
                stripped = self._buf.lstrip()
                if THINK_OPEN.startswith(stripped) and len(stripped) < len(THINK_OPEN):
                    break  # could still become <think>
                self._started = True
                if stripped.startswith(THINK_OPEN):
                    self._in_think = True
                    self._saw_tag = True
                    self._buf = stripped[len(THINK_OPEN) :]
                continue
            if self._in_think:
                idx = self._buf.find(THINK_CLOSE)
                if idx >= 0:
                    if idx:
                        out.append(Delta("reasoning", self._buf[:idx]))
                    self._buf = self._buf[idx + len(THINK_CLOSE) :]
                    self._in_think = False
                    self._saw_tag = True
                    self._strip_leading = True
                    continue
                keep = _partial_suffix(self._buf, THINK_CLOSE)
                emit = self._buf[: len(self._buf) - keep]
                if emit:
                    out.append(Delta("reasoning", emit))
                self._buf = self._buf[len(self._buf) - keep :]
                break
            if self._strip_leading:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._strip_leading = False
            out.append(Delta("answer", self._buf))
            self._buf = ""
        return out

    def finish(self) -> list[Delta]:
        rest, self._buf = self._buf, ""
        out = [Delta("reasoning" if self._in_think else "answer", rest)] if rest else []
        if self._template_open and not self._saw_tag and not self._answered:
            text = ("".join(self._reasoning) + rest).strip()
            self.fell_back = True
            return [Delta("answer", text)] if text else []
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(text: str, think_open: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a complete output."""
    sp = ThinkSplitter(think_open)
    parts = sp.feed(text)
    last = sp.finish()
    if sp.fell_back:  # the template opened a think block the model never used: all of it is the answer
        return "", "".join(d.text for d in last)
    parts += last
    reasoning = "".join(d.text for d in parts if d.kind == "reasoning").strip()
    answer = "".join(d.text for d in parts if d.kind == "answer").strip()
    return reasoning, answer


class _HttpStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _HttpStatus):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.RemoteProtocolError)


@dataclass
class _Call:
    """One call's budget: its deadline (loop time, llm.timeout_s after the call starts) and its attempts."""

    deadline: float
    attempts: int = 0
    out_of_time: bool = False  # a retry was not made: its backoff would have ended past the deadline


def normalise_base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class LlmClient:
    def __init__(self, cfg: LlmConfig, model: str, think_open: bool = False) -> None:
        if not cfg.base_url:
            raise ValueError("LlmClient needs llm.base_url")
        self.cfg = cfg
        self.model = model
        self.think_open = think_open
        self.base_url = normalise_base_url(cfg.base_url)
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s),
                limits=httpx.Limits(max_connections=self.cfg.max_concurrency),
            )
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _payload(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, stream: bool) -> Any:
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": stream,
        }

    def _call(self) -> _Call:
        return _Call(asyncio.get_running_loop().time() + self.cfg.timeout_s)

    def _retrying(self, call: _Call) -> AsyncRetrying:
        loop = asyncio.get_running_loop()

        def within_budget(state: RetryCallState) -> None:
            """Raise the last error now when the backoff before the next attempt would end past the deadline."""
            sleep = state.next_action.sleep if state.next_action is not None else 0.0
            exc = state.outcome.exception() if state.outcome is not None else None
            if exc is not None and loop.time() + sleep >= call.deadline:
                call.out_of_time = True
                raise exc

        return AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=wait_exponential_jitter(initial=self.cfg.backoff_initial_s, max=self.cfg.backoff_max_s),
            retry=retry_if_exception(_retryable),
            before_sleep=within_budget,
            reraise=True,
        )

    def _timeout_error(self) -> DependencyTimeoutError:
        return DependencyTimeoutError(
            f"LLM endpoint {self.base_url}: no answer within {self.cfg.timeout_s:g}s "
            "(llm.timeout_s, the budget of the whole call: retries and streaming included)",
            reason="LLM_TIMEOUT",
        )

    def _domain_error(self, exc: BaseException, call: _Call) -> CxrError:
        where = f"LLM endpoint {self.base_url}"
        attempts = ""
        if _retryable(exc):
            attempts = f" after {call.attempts} attempt{'s' if call.attempts != 1 else ''}"
            if call.out_of_time:
                attempts += f" (no time left in llm.timeout_s={self.cfg.timeout_s:g}s for another)"
        if isinstance(exc, httpx.ConnectTimeout):
            return DependencyTimeoutError(
                f"{where}: no connection within {self.cfg.connect_timeout_s:g}s{attempts}", reason="LLM_TIMEOUT"
            )
        if isinstance(exc, httpx.TimeoutException):
            return self._timeout_error()
        if isinstance(exc, httpx.ConnectError):
            return DependencyUnavailableError(f"{where} is unreachable ({exc}){attempts}", reason="LLM_UNAVAILABLE")
        if isinstance(exc, _HttpStatus):
            detail = exc.body.strip().replace("\n", " ")[:300]
            return DependencyUnavailableError(
                f"{where} answered HTTP {exc.status}{attempts}: {detail}",
                reason="LLM_SERVER_ERROR" if exc.status >= 500 or exc.status == 429 else "LLM_REQUEST_REJECTED",
                metadata={"http_status": str(exc.status)},
            )
        if isinstance(exc, httpx.HTTPError):
            return DependencyUnavailableError(f"{where}: {type(exc).__name__}: {exc}", reason="LLM_UNAVAILABLE")
        return DependencyUnavailableError(f"{where}: {exc}", reason="LLM_BAD_RESPONSE")

    def _bad_output(self, what: str) -> DependencyUnavailableError:
        return DependencyUnavailableError(
            f"LLM endpoint {self.base_url} returned output that is not an OpenAI chat completion: {what}",
            reason="LLM_BAD_RESPONSE",
        )

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int | None = None, temperature: float | None = None
    ) -> Completion:
        """One non-streaming chat completion, reasoning separated."""
        call = self._call()  # the budget starts with the call (the first one also builds the HTTP client)
        client = self._http()
        payload = self._payload(
            messages,
            max_tokens or self.cfg.max_tokens,
            self.cfg.temperature if temperature is None else temperature,
            False,
        )
        assert self._sem is not None
        try:
            async with asyncio.timeout_at(call.deadline), self._sem:
                async for attempt in self._retrying(call):
                    with attempt:
                        call.attempts = attempt.retry_state.attempt_number
                        resp = await client.post("/chat/completions", json=payload)
                        if resp.status_code >= 400:
                            raise _HttpStatus(resp.status_code, resp.text)
        except TimeoutError:
            raise self._timeout_error() from None
        except (httpx.HTTPError, _HttpStatus) as exc:
            raise self._domain_error(exc, call) from exc
        try:
            body = resp.json()
            choice = body["choices"][0]
            msg = choice["message"]
            content = msg.get("content") or ""
            extra_reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
            finish = str(choice.get("finish_reason") or "stop")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise self._bad_output(f"{type(exc).__name__} while reading {resp.text[:200]!r}") from None
        if not isinstance(content, str):
            raise self._bad_output("message.content is not a string")
        reasoning, answer = split_reasoning(content, self.think_open and not extra_reasoning)
        reasoning = "\n".join(x for x in (str(extra_reasoning).strip(), reasoning) if x)
        return Completion(answer, reasoning, finish, str(body.get("model") or self.model))

    async def stream(
        self, messages: list[dict[str, str]], max_tokens: int | None = None, temperature: float | None = None
    ) -> AsyncIterator[Delta | Finish]:
        """Stream deltas (answer/reasoning), then one Finish."""
        call = self._call()  # the budget starts with the call (the first one also builds the HTTP client)
        client = self._http()
        payload = self._payload(
            messages,
            max_tokens or self.cfg.max_tokens,
            self.cfg.temperature if temperature is None else temperature,
            True,
        )
        assert self._sem is not None
        try:
            async with asyncio.timeout_at(call.deadline):
                await self._sem.acquire()
        except TimeoutError:
            raise self._timeout_error() from None
        try:
            resp: httpx.Response | None = None
            try:
                async with asyncio.timeout_at(call.deadline):
                    async for attempt in self._retrying(call):
                        with attempt:
                            call.attempts = attempt.retry_state.attempt_number
                            req = client.build_request("POST", "/chat/completions", json=payload)
                            resp = await client.send(req, stream=True)
                            if resp.status_code >= 400:
                                body = (await resp.aread()).decode("utf-8", "replace")
                                await resp.aclose()
                                raise _HttpStatus(resp.status_code, body)
            except TimeoutError:
                if resp is not None:
                    await resp.aclose()
                raise self._timeout_error() from None
            except (httpx.HTTPError, _HttpStatus) as exc:
                raise self._domain_error(exc, call) from exc
            assert resp is not None
            events = self._parse_sse(resp)
            try:
                while True:
                    try:  # each read under the call's deadline; never across a yield (the consumer's own time)
                        async with asyncio.timeout_at(call.deadline):
                            item = await anext(events)
                    except StopAsyncIteration:
                        break
                    yield item
            except TimeoutError:
                raise self._timeout_error() from None
            except httpx.HTTPError as exc:
                raise self._domain_error(exc, call) from exc
            finally:
                await events.aclose()
                await resp.aclose()
        finally:
            self._sem.release()

    async def _parse_sse(self, resp: httpx.Response) -> AsyncGenerator[Delta | Finish, None]:
        splitter = ThinkSplitter(self.think_open)
        finish = ""
        got_any = False
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            if not line.startswith("data:"):
                raise self._bad_output(f"unexpected line {line[:120]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
                if "error" in event and "choices" not in event:
                    raise DependencyUnavailableError(
                        f"LLM endpoint {self.base_url} reported an error mid-stream: {str(event['error'])[:300]}",
                        reason="LLM_SERVER_ERROR",
                    )
                choices = event["choices"]
                if not choices:
                    continue  # usage-only chunk
                choice = choices[0]
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                content = delta.get("content")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                raise self._bad_output(f"{type(exc).__name__} in event {data[:120]!r}") from None
            got_any = True
            if reasoning:
                yield Delta("reasoning", str(reasoning))
            if content:
                for d in splitter.feed(str(content)):
                    yield d
            if choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
        else:
            if not got_any:
                raise self._bad_output("the stream ended without any event")
        for d in splitter.finish():
            yield d
        yield Finish(finish or "stop")
