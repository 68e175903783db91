"""A request's failure as a stream carries it, written and read back."""

from meshserve.common.stream_answers import error_parts, error_text


def test_a_failure_reads_back_as_it_was_written():
    text = error_text("INVALID_ARGUMENT", "model 'm' version 1: IN must be: positive")
    assert text == "INVALID_ARGUMENT: model 'm' version 1: IN must be: positive"
    assert error_parts(text) == ("INVALID_ARGUMENT",
                                 "model 'm' version 1: IN must be: positive")


def test_a_text_that_names_no_code_is_unknown_and_kept_whole():
    assert error_parts("in ensemble 'e': boom") == ("UNKNOWN", "in ensemble 'e': boom")
    assert error_parts("boom") == ("UNKNOWN", "boom")
