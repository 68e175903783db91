"""Argument types the command line shares: argparse calls them with the text given and
reports their ArgumentTypeError as a usage error naming the flag."""

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not '{text}'")
    return value


def non_empty(text: str) -> str:
    """Text with something in it besides spaces."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive_float(text: str) -> float:
    """A number above 0."""
    return _number(text, lambda value: value > 0, "a number above 0")


def non_negative_float(text: str) -> float:
    """A number of at least 0."""
    return _number(text, lambda value: value >= 0, "a number of at least 0")


def _number(text: str, accepts, wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # accepted by no bound
    if not accepts(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, not '{text}'")
    return value
