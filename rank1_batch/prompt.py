"""The Rank1 prompt and the forced-pass text, exactly as the reference procedure builds them."""

from __future__ import annotations

import re

PROMPT_HEAD = "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'."
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
QUERY_PLACEHOLDER = "FILL_QUERY_HERE"
# The main pass stops on these; which one matched is the model's answer.
STOP_STRINGS = (f"{THINK_CLOSE} true", f"{THINK_CLOSE} false")
# Label words as the model writes them after `</think>`: a leading space, one token each.
LABEL_TRUE = " true"
LABEL_FALSE = " false"

_LAST_SENTENCE_END = re.compile(r"^(.*[.!?])", re.DOTALL)


def query_text(query: str, instruction: str | None = None, task_template: str | None = None) -> str:
    """The query as it goes into the prompt: instruction appended, then wrapped in the task template."""
    if instruction and instruction != query:
        query = f"{query} {instruction}".strip()
    if task_template:
        query = task_template.replace(QUERY_PLACEHOLDER, query)
    return query


def passage_text(text: str, title: str | None = None) -> str:
    return f"{title} {text}" if title else text


def prompt_body(query: str, passage: str) -> str:
    """The prompt up to, not including, the trailing `<think>` control token."""
    return f"{PROMPT_HEAD}\nQuery: {query}\nPassage: {passage}\n"


def prompt(query: str, passage: str) -> str:
    return prompt_body(query, passage) + THINK_OPEN


def cut_to_last_sentence(reasoning: str) -> str:
    """The reasoning up to its last `.`, `!` or `?` (all of it if it has none), stripped."""
    match = _LAST_SENTENCE_END.match(reasoning)
    return (match.group(1) if match else reasoning).strip()


def forced_continuation(reasoning: str) -> str:
    """Text that follows the prompt in the forced pass, up to (not including) the closing `</think>`.

    The reference builds `prompt + "\\n" + reasoning + "\\n</think>"`; the closing tag is appended
    as its control-token id by the engine so reasoning text can never spell it.
    """
    return "\n" + cut_to_last_sentence(reasoning) + "\n"
