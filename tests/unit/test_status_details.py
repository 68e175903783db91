"""A status message is cut to what a header can carry, never inside a character."""

from meshserve.common.server import MAX_DETAILS_BYTES, status_details


def test_a_short_message_is_left_as_it_is():
    assert status_details("unknown model 'nope'") == "unknown model 'nope'"
    exact = "x" * MAX_DETAILS_BYTES
    assert status_details(exact) == exact


def test_a_long_message_is_cut_and_marked():
    for unit in ("m", "é", "模", "😀"):  # 1 to 4 bytes in UTF-8
        cut = status_details(f"unknown model '{unit * 5000}'")
        assert cut.startswith(f"unknown model '{unit}") and cut.endswith("…")
        assert MAX_DETAILS_BYTES - 4 < len(cut.encode()) <= MAX_DETAILS_BYTES
