"""Pinning a request to one model version: the gRPC metadata key (and HTTP header) a client
sets, the ingress and router pass on, and the control plane's routes match before splitting
the rest of a model's traffic by weight."""

PIN_HEADER = "x-model-version"
