"""Pieces of config.pbtxt text, as the tools that write model repositories write them."""


def dims_text(dims: tuple[int, ...]) -> str:
    """Dimensions as config.pbtxt writes them: `[ 3, 64, 64 ]`."""
    return "[ " + ", ".join(str(d) for d in dims) + " ]"
