"""Priority levels as Triton's dynamic batcher defines them (1 = most urgent)."""

# The largest priority a group item carries (its field is a uint32). Every priority past a
# model's last level means its default level, so a request's larger one travels as this.
MAX_CARRIED = (1 << 32) - 1


def priority_level(priority: int, levels: int, default_level: int) -> int:
    """The level of a request's `priority` in a model with `levels` levels (0 or 1: one).

    0 (or below) and anything past the last level mean the default level, as Triton reads a
    request's priority. A default level of 0 or out of range is the last (least urgent).
    """
    levels = max(levels, 1)
    if 1 <= priority <= levels:
        return priority
    return default_level if 1 <= default_level <= levels else levels
