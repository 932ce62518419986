"""The engine's per-token logprobs (``{token_id: logprob}`` per generated token) in OpenAI's two shapes."""
from __future__ import annotations

from fdpp.server.protocol import ChatCompletionLogProb, ChatCompletionLogProbs, CompletionLogProbs, TopLogprob
from fdpp.server.state import ServerState


def sorted_top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(token_id, logprob)`` of one entry."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(st: ServerState, token_ids: list[int], entries: list[dict[int, float]], k: int,
                        offset: int) -> CompletionLogProbs:
    """/v1/completions' logprobs of ``token_ids``, whose text starts at character ``offset``."""
    lp = CompletionLogProbs()
    for tid, entry in zip(token_ids, entries):
        text = st.token_text(tid)
        lp.tokens.append(text)
        lp.token_logprobs.append(entry.get(tid))
        top = {st.token_text(t): v for t, v in sorted_top(entry, k)}
        top.setdefault(text, entry.get(tid, float("-inf")))
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def chat_logprobs(st: ServerState, token_ids: list[int], entries: list[dict[int, float]],
                  k: int) -> ChatCompletionLogProbs:
    """/v1/chat/completions' logprobs of ``token_ids`` with the top ``k`` alternatives."""
    content = []
    for tid, entry in zip(token_ids, entries):
        text = st.token_text(tid)
        top = [TopLogprob(token=st.token_text(t), logprob=v, bytes=list(st.token_text(t).encode("utf-8", "replace")))
               for t, v in sorted_top(entry, k)]
        content.append(ChatCompletionLogProb(token=text, logprob=entry.get(tid, float("-inf")),
                                             bytes=list(text.encode("utf-8", "replace")), top_logprobs=top))
    return ChatCompletionLogProbs(content=content)
