from rank1_batch import prompt


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
    assert prompt.query_text("find papers", "") == "find papers"
    assert prompt.query_text("find papers", None) == "find papers"


def test_task_template_wraps_the_extended_query():
    template = "Biology question: FILL_QUERY_HERE. Find support."
    assert prompt.query_text("why do cells die", "be brief", template) == (
        "Biology question: why do cells die be brief. Find support."
    )


def test_title_is_prepended():
    assert prompt.passage_text("body", "Title") == "Title body"
    assert prompt.passage_text("body", None) == "body"
    assert prompt.passage_text("body", "") == "body"


def test_reasoning_is_cut_to_its_last_sentence_end():
    assert prompt.cut_to_last_sentence(" It is. Maybe not! Is it? and then") == "It is. Maybe not! Is it?"
    assert prompt.cut_to_last_sentence("  no sentence end here ") == "no sentence end here"
    assert prompt.cut_to_last_sentence("") == ""


def test_forced_continuation_follows_the_reference_text():
    # reference: prompt + "\n" + reasoning + "\n</think>"; `</think>` is added as its token id
    assert prompt.forced_continuation("The query asks. The passage ans") == "\nThe query asks.\n"
