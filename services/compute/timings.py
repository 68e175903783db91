"""How long each phase of running one batch took, as every backend reports it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Timings:
    input_ns: int
    infer_ns: int
    output_ns: int
