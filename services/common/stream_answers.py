"""How a stream of answers (`ModelStreamInfer`) says which is a request's last, as Triton says
it: parameters that the ingress writes and reads, and that a caller through the ingress (HTTP's
generate, a Python model's call to a decoupled model) reads and leaves out of what it gives on."""

# A response parameter: true on a request's last answer, false on a decoupled model's others.
FINAL_RESPONSE = "triton_final_response"
# A request parameter: write a decoupled model's final flag even when it comes alone (an empty
# last answer); without it, such a flag ends the request without an answer of its own.
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
