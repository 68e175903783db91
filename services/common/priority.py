"""Priority levels as Triton's dynamic batcher defines them (1 = most urgent)."""


def priority_level(priority: int, levels: int, default_level: int) -> int:
    """The level of a request's `priority` in a model with `levels` levels (0 or 1: one).

    0 (or below) means the default level; above the last level means the last level. A
    default level of 0 or out of range is the last (least urgent) level.
    """
    levels = max(levels, 1)
    if priority <= 0:
        priority = default_level
        if priority <= 0:
            return levels
    return min(priority, levels)
