import itertools
import random

from rank1_batch.model import prompt

from . import reference


def test_prompt_is_the_reference_text():
    assert prompt.prompt("what is rba", "RBA is a bank.") == (
        "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
        "Query: what is rba\n"
        "Passage: RBA is a bank.\n"
        "<think>"
    )


def test_instruction_is_appended_unless_it_equals_the_query():
    assert prompt.query_text("find papers", "about cats") == "find papers about cats"
    assert prompt.query_text("find papers", "find papers") == "find papers"
    assert prompt.query_text(" find papers ", "  find papers") == "find papers"  # equal once stripped
    assert prompt.query_text(" find papers ", "") == "find papers"  # an instruction, even empty, strips
    assert prompt.query_text(" find papers ", None) == " find papers "  # no instruction: as given


def test_task_template_wraps_the_extended_query():
    template = "Biology question: FILL_QUERY_HERE. Find support."
    assert prompt.query_text("why do cells die", "be brief", template) == (
        "Biology question: why do cells die be brief. Find support."
    )


def test_title_is_prepended_whenever_there_is_one():
    assert prompt.passage_text("body", "Title") == "Title body"
    assert prompt.passage_text("body", "") == " body"  # an empty title is a title
    assert prompt.passage_text("body", None) == "body"


def test_query_and_passage_follow_the_references_rules():
    queries = ["find papers", " find papers ", "find  papers", ""]
    instructions = [None, "", " ", "about cats", "find papers", " find papers  ", "FIND PAPERS"]
    titles = [None, "", " ", "Title"]
    templates = [None, "", "Q: FILL_QUERY_HERE!"]
    for query, instruction, title, template in itertools.product(queries, instructions, titles, templates):
        passage = {"text": "body"} if title is None else {"title": title, "text": "body"}
        ours = prompt.prompt(prompt.query_text(query, instruction, template), prompt.passage_text("body", title))
        theirs = reference.prompt_text(
            reference.query_with_instruction(query, instruction), reference.passage_with_title(passage), template
        )
        assert ours == theirs, (query, instruction, title, template)


def test_reasoning_is_cut_to_its_last_sentence_end():
    assert prompt.cut_to_last_sentence(" It is. Maybe not! Is it? and then") == "It is. Maybe not! Is it?"
    assert prompt.cut_to_last_sentence("  no sentence end here ") == "no sentence end here"
    assert prompt.cut_to_last_sentence("") == ""


def test_cut_is_the_references_on_any_text():
    rng = random.Random(5)
    for _ in range(3000):
        text = "".join(rng.choice("ab .!?\n\t") for _ in range(rng.randrange(12)))
        assert prompt.cut_to_last_sentence(text) == reference.cleaned_text(text), repr(text)


def test_forced_continuation_follows_the_reference_text():
    # reference: prompt + "\n" + reasoning + "\n</think>"
    assert prompt.forced_continuation("The query asks. The passage ans") == "\nThe query asks.\n</think>"


def test_forced_continuation_keeps_what_follows_a_stray_think_close():
    generated = " The town matches.</think> maybe. The topic"
    assert prompt.forced_continuation(generated) == "\nThe town matches.</think> maybe.\n</think>"
    body = prompt.prompt("q", "p")
    assert body + prompt.forced_continuation(generated) == reference.forced_prompt(body, generated)
