"""A small OpenAI-compatible chat server for tests: an honest stand-in for vLLM.

It speaks the same wire protocol as vLLM's `/v1/chat/completions` (JSON and SSE streaming,
`[DONE]` terminator) so the real `cxr_rag.llm.LlmClient` talks to a real HTTP server over
loopback, but its "model" is scripted: behaviour is chosen by the requested model name.

    answer-model            a fixed cited answer ("... [1] ... [2] ... [99]")
    deepseek-r1-stub        "<think>reasoning</think>answer [1]" (explicit think block)
    deepseek-r1-distill-x   "reasoning</think>\n\nanswer [1]" (template-opened think, as vLLM + R1)
    slow                    sleeps 3 s before the first byte
    error500                HTTP 500 every time
    flaky                   HTTP 503 on the first request, then an answer
    garbage                 HTTP 200 with a body that is not a chat completion
    midstream-error         a valid first event, then an error event
    vllm-reasoning          reasoning in `message.reasoning` / `delta.reasoning` (vLLM's reasoning parser,
                            newer field name), cited numbers in it too; the answer in `content`
    vllm-reasoning-content  the same in `reasoning_content` (vLLM's older field name)
    deepseek-r1-notags      an R1-named model that writes no think tags at all, one [n] out of range
    trickle                 one piece every TRICKLE_INTERVAL_S for TRICKLE_FOR_S: an SSE token when
                            streaming, else a byte of leading JSON whitespace, then the answer

GET /stats returns the number of requests per model (to check retries).
Run: `python -m tests.support.openai_stub` prints `PORT <n>` on stdout once listening.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "The passages report a benefit [1]. A second study agrees [2]. Unsupported claim [99]."
TRICKLE_INTERVAL_S = 0.2
TRICKLE_FOR_S = 30.0
REASONED = {"vllm-reasoning": "reasoning", "vllm-reasoning-content": "reasoning_content"}
REASONING = ["Weighing [1] ", "against [2]."]
REASONED_ANSWER = ["Supported ", "[2]."]
COUNTS: Counter[str] = Counter()
LOCK = threading.Lock()


def script(model: str, n: int) -> tuple[int, list[str] | None, str | None]:
    """(status, pieces of content, raw body override)."""
    if model == "error500":
        return 500, None, json.dumps({"error": {"message": "CUDA out of memory (scripted)", "code": 500}})
    if model == "flaky" and n == 1:
        return 503, None, json.dumps({"error": {"message": "warming up"}})
    if model == "garbage":
        return 200, None, "<html>this is not a chat completion</html>"
    if model == "deepseek-r1-stub":
        return 200, ["<thi", "nk>Let me think", " about it.</th", "ink>\n\nYes, it helps [1]."], None
    if model == "deepseek-r1-notags":
        return 200, ["Passage [1] ", "says so; ", "see [7]."], None
    if model.startswith("deepseek-r1-distill"):
        return 200, ["Reasoning ", "first.", "</think>", "\n\nYes [1]."], None
    words = ANSWER.split(" ")
    return 200, [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)], None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: str, ctype: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/stats":
            with LOCK:
                self._send(200, json.dumps(dict(COUNTS)))
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "answer-model", "object": "model"}]}))
        else:
            self._send(404, json.dumps({"error": "not found"}))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/v1/chat/completions":
            self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))
            return
        model = str(req.get("model", ""))
        with LOCK:
            COUNTS[model] += 1
            n = COUNTS[model]
        if model == "slow":
            time.sleep(3)
        if model == "trickle":
            try:
                self._trickle(bool(req.get("stream")))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up: what the trickle tests expect
            return
        status, pieces, raw = script(model, n)
        if raw is not None:
            self._send(status, raw)
            return
        assert pieces is not None
        field = REASONED.get(model)
        if field is not None:
            pieces = REASONED_ANSWER
        if not req.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            if field is not None:
                message[field] = "".join(REASONING)
            body = {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            self._send(200, json.dumps(body))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(payload: str) -> None:
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        for piece in REASONING if field is not None else []:
            event(json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {field: piece}}]}))
        for i, piece in enumerate(pieces):
            if model == "midstream-error" and i == 1:
                event(json.dumps({"error": {"message": "engine died (scripted)"}}))
                break
            chunk = {
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}}],
            }
            event(json.dumps(chunk))
        else:
            event(
                json.dumps(
                    {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                )
            )
            event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _trickle(self, stream: bool) -> None:
        """Keep every read short but never finish within TRICKLE_FOR_S (bounded: it then answers)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        end = time.monotonic() + TRICKLE_FOR_S
        while time.monotonic() < end:
            if stream:
                delta = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "tok "}}]}
                chunk(f"data: {json.dumps(delta)}\n\n".encode())
            else:
                chunk(b" ")  # JSON allows leading whitespace
            time.sleep(TRICKLE_INTERVAL_S)
        if stream:
            chunk(b"data: [DONE]\n\n")
        else:
            message = {"role": "assistant", "content": "late [1]"}
            chunk(json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}).encode())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
