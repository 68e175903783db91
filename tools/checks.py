"""How a command that checks something ends: each problem on a line of its own and exit
status 1, or one line saying what was found intact and exit status 0."""

from collections.abc import Sequence


def verdict(problems: Sequence[str], intact: str) -> int:
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(intact)
    return 0
