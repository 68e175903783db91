"""How a stream of answers (`ModelStreamInfer`) says which is a request's last, as Triton says
it, and how it carries a request's failure: what the ingress writes, and what a caller through
the ingress (HTTP's generate, a Python model's call to a decoupled model) reads."""

from meshserve.common.forwarding import CODE_NUMBER

# A response parameter: true on a request's last answer, false on a decoupled model's others.
FINAL_RESPONSE = "triton_final_response"
# A request parameter: write a decoupled model's final flag even when it comes alone (an empty
# last answer); without it, such a flag ends the request without an answer of its own.
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"


def error_text(code: str, message: str) -> str:
    """A request's failure as a stream's `error_message` carries it: `CODE: message`."""
    return f"{code}: {message}"


def error_parts(text: str) -> tuple[str, str]:
    """The status code name and the message of a stream's `error_message` (UNKNOWN and the
    whole text when it names no code)."""
    code, _, message = text.partition(": ")
    return (code, message) if code in CODE_NUMBER else ("UNKNOWN", text)
