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
    """The query as it goes into the prompt: instruction appended, then wrapped in the task template.

    The reference's rule: an instruction (any but None, even an empty one) gives
    `f"{query} {instruction}".strip()`, or the stripped query when the two are equal once stripped.
    """
    if instruction is not None:
        query = query.strip() if query.strip() == instruction.strip() else f"{query} {instruction}".strip()
    if task_template:
        query = task_template.replace(QUERY_PLACEHOLDER, query)
    return query


def passage_text(text: str, title: str | None = None) -> str:
    """A title is prepended whenever there is one, even an empty one (the reference tests for the
    key, not its value); None is no title."""
    return text if title is None else f"{title} {text}"


def prompt_body(query: str, passage: str) -> str:
    """The prompt up to, not including, the trailing `<think>` control token."""
    return f"{PROMPT_HEAD}\nQuery: {query}\nPassage: {passage}\n"


def prompt(query: str, passage: str) -> str:
    return prompt_body(query, passage) + THINK_OPEN


def cut_to_last_sentence(reasoning: str) -> str:
    """The reasoning up to its last `.`, `!` or `?` (all of it if it has none), stripped."""
    match = _LAST_SENTENCE_END.match(reasoning)
    return (match.group(1) if match else reasoning).strip()


def forced_continuation(generated: str) -> str:
    """What follows the prompt in the forced pass: `"\\n" + cut + "\\n</think>"`, as the reference
    builds it from all the main pass generated, a `</think>` it wrote included.

    Tokenised with control tokens parsed, as the reference's text prompt is: the closing tag, and
    any the model wrote, are the control token.
    """
    return f"\n{cut_to_last_sentence(generated)}\n{THINK_CLOSE}"
