"""Question -> retrieval -> prompt with numbered passages -> answer with [n] citations.

- Passages enter the prompt in rank order until the context token budget is spent.
- When the best dense similarity is below `min_relevance` the service answers that nothing
  relevant was found (finish_reason `no_relevant_passages`) instead of letting a model guess.
- `llm.mode: extractive`: no language model; the answer is the retrieved sentences most
  similar to the question, each cited, and the response says `extractive`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_rag import metrics
from cxr_rag.config import RagConfig
from cxr_rag.embeddings import Embedder
from cxr_rag.llm import Delta, Finish, LlmClient
from cxr_rag.retrieval import Mode, Passage, RetrievalResult, Retriever
from cxr_serving.errors import CxrError, InvalidInputError

NO_RELEVANT = "no_relevant_passages"
EXTRACTIVE_MODEL = "extractive"
EXTRACTIVE_PREFIX = "Extractive answer (no language model; the retrieved sentences most relevant to the question): "
MAX_QUESTION_CHARS = 4000

SYSTEM_PROMPT = (
    "You are a medical literature assistant. Answer the question using only the numbered passages. "
    "Cite the passages that support each statement with their numbers in square brackets, e.g. [1] or [2][3]. "
    "If the passages do not contain the answer, say that they do not. Be concise. "
    "This is literature support, not a diagnosis."
)

_CITE = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


@dataclass(frozen=True)
class Citation:
    number: int
    passage: Passage


@dataclass
class AnswerRequest:
    question: str
    top_k: int = 0
    filters: dict[str, str] = field(default_factory=dict)
    mode: Mode = Mode.HYBRID
    max_tokens: int = 0
    temperature: float | None = None
    include_reasoning: bool = False


@dataclass
class Answer:
    text: str
    citations: list[Citation]
    passages: list[Passage]
    model: str
    finish_reason: str
    reasoning: str = ""
    extractive: bool = False


@dataclass(frozen=True)
class PassagesEvent:
    passages: list[Passage]


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class ReasoningEvent:
    text: str


@dataclass(frozen=True)
class DoneEvent:
    citations: list[Citation]
    finish_reason: str
    model: str
    extractive: bool


StreamEvent = PassagesEvent | TextEvent | ReasoningEvent | DoneEvent


def fit_budget(passages: list[Passage], tokenizer: Any, budget: int) -> list[Passage]:
    """The leading passages whose token count fits in `budget` (always at least one)."""
    out: list[Passage] = []
    used = 0
    for p in passages:
        n = len(tokenizer.encode(p.text, add_special_tokens=False).ids)
        if out and used + n > budget:
            break
        out.append(p)
        used += n
    return out


def format_passage(n: int, p: Passage) -> str:
    label = "; ".join(x for x in (p.title, p.source, p.metadata.get("section", "")) if x)
    return f"[{n}] ({label}) {p.text}" if label else f"[{n}] {p.text}"


def build_messages(question: str, passages: list[Passage], system_prompt: str | None = None) -> list[dict[str, str]]:
    context = "\n\n".join(format_passage(i, p) for i, p in enumerate(passages, 1))
    user = f"Passages:\n{context}\n\nQuestion: {question}\n\nAnswer, citing passages as [n]:"
    return [{"role": "system", "content": system_prompt or SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_citations(text: str, passages: list[Passage]) -> list[Citation]:
    """[n] markers in order of first use, mapped to passages; numbers outside 1..len are dropped."""
    seen: dict[int, Citation] = {}
    for m in _CITE.finditer(text):
        for num in re.split(r"\s*[,;]\s*", m.group(1)):
            n = int(num)
            if 1 <= n <= len(passages) and n not in seen:
                seen[n] = Citation(n, passages[n - 1])
    return list(seen.values())


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if len(s.strip()) > 3]


class AnswerPipeline:
    def __init__(self, cfg: RagConfig, retriever: Retriever, embedder: Embedder, tokenizer: Any, llm: LlmClient | None):
        self.cfg = cfg
        self.retriever = retriever
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.llm = llm

    @property
    def extractive(self) -> bool:
        return self.llm is None

    @property
    def model_name(self) -> str:
        return EXTRACTIVE_MODEL if self.llm is None else self.llm.model

    def _validate(self, req: AnswerRequest) -> int:
        if not req.question.strip():
            raise InvalidInputError("question: must not be empty")
        if len(req.question) > MAX_QUESTION_CHARS:
            raise InvalidInputError(f"question: longer than {MAX_QUESTION_CHARS} characters")
        k = req.top_k or self.cfg.top_k
        if k < 1 or k > self.cfg.max_top_k:
            raise InvalidInputError(f"top_k: must be between 1 and {self.cfg.max_top_k}")
        if req.max_tokens < 0 or req.max_tokens > 32768:
            raise InvalidInputError("max_tokens: must be between 0 and 32768")
        if req.temperature is not None and not 0 <= req.temperature <= 2:
            raise InvalidInputError("temperature: must be between 0 and 2")
        return k

    async def retrieve(self, req: AnswerRequest) -> tuple[RetrievalResult, list[Passage]]:
        k = self._validate(req)
        started = time.perf_counter()
        result = await asyncio.to_thread(
            self.retriever.search, req.question, k, req.mode, req.filters or None, need_similarity=True
        )
        metrics.observe(f"retrieval:{req.mode.value}", time.perf_counter() - started)
        if not self.relevant(result):
            metrics.REFUSALS.inc()
        return result, fit_budget(result.passages, self.tokenizer, self.cfg.context_token_budget)

    def relevant(self, result: RetrievalResult) -> bool:
        best = result.best_similarity
        return bool(result.passages) and best is not None and best >= self.cfg.min_relevance

    def refusal(self, result: RetrievalResult) -> str:
        best = "none" if result.best_similarity is None else f"{result.best_similarity:.2f}"
        return (
            "No relevant passages were found in the literature store for this question "
            f"(best similarity {best} < threshold {self.cfg.min_relevance:.2f}), so no answer is given."
        )

    def extract(self, question: str, passages: list[Passage]) -> tuple[str, list[Citation]]:
        """The sentences most similar to the question, each followed by its passage number."""
        cands = [(n, s) for n, p in enumerate(passages, 1) for s in split_sentences(p.text)]
        if not cands:
            return EXTRACTIVE_PREFIX.strip(), []
        vecs = self.embedder.encode([question] + [s for _, s in cands])
        sims = vecs[1:] @ vecs[0]
        order = np.argsort(-sims, kind="stable")[: self.cfg.llm.extractive_sentences]
        parts = [f"{cands[i][1]} [{cands[i][0]}]" for i in order]
        text = EXTRACTIVE_PREFIX + " ".join(parts)
        return text, parse_citations(text, passages)

    def _temperature(self, req: AnswerRequest) -> float | None:
        return req.temperature if req.temperature else None

    async def answer(self, req: AnswerRequest) -> Answer:
        result, used = await self.retrieve(req)
        if not self.relevant(result):
            return Answer(self.refusal(result), [], result.passages, self.model_name, NO_RELEVANT, "", self.extractive)
        if self.llm is None:
            text, cites = await asyncio.to_thread(self.extract, req.question, used)
            return Answer(text, cites, used, EXTRACTIVE_MODEL, "stop", "", True)
        messages = build_messages(req.question, used, self.cfg.llm.system_prompt)
        started = time.perf_counter()
        try:
            comp = await self.llm.complete(messages, req.max_tokens or None, self._temperature(req))
        except CxrError as exc:
            metrics.LLM_ERRORS.labels(exc.reason).inc()
            raise
        metrics.observe(f"llm:{self.llm.model}", time.perf_counter() - started)
        return Answer(
            comp.text,
            parse_citations(comp.text, used),
            used,
            comp.model,
            comp.finish_reason,
            comp.reasoning if req.include_reasoning else "",
            False,
        )

    async def stream(self, req: AnswerRequest) -> AsyncIterator[StreamEvent]:
        result, used = await self.retrieve(req)
        if not self.relevant(result):
            yield PassagesEvent(result.passages)
            yield TextEvent(self.refusal(result))
            yield DoneEvent([], NO_RELEVANT, self.model_name, self.extractive)
            return
        yield PassagesEvent(used)
        if self.llm is None:
            text, cites = await asyncio.to_thread(self.extract, req.question, used)
            yield TextEvent(text)
            yield DoneEvent(cites, "stop", EXTRACTIVE_MODEL, True)
            return
        messages = build_messages(req.question, used, self.cfg.llm.system_prompt)
        answer: list[str] = []
        finish = "stop"
        started = time.perf_counter()
        try:
            async for item in self.llm.stream(messages, req.max_tokens or None, self._temperature(req)):
                if isinstance(item, Finish):
                    finish = item.reason
                elif isinstance(item, Delta) and item.kind == "answer":
                    answer.append(item.text)
                    yield TextEvent(item.text)
                elif isinstance(item, Delta) and req.include_reasoning:
                    yield ReasoningEvent(item.text)
        except CxrError as exc:
            metrics.LLM_ERRORS.labels(exc.reason).inc()
            raise
        metrics.observe(f"llm:{self.llm.model}", time.perf_counter() - started)
        yield DoneEvent(parse_citations("".join(answer), used), finish, self.llm.model, False)
