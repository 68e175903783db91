"""A byte budget: bytes of requests accepted and not yet answered, refused beyond a limit."""

from meshserve.common.errors import ResourceExhausted


class ByteBudget:
    """Holds up to `limit` bytes (0 = unbounded); `name` is the setting that sets it."""

    def __init__(self, limit: int, name: str, retry_after: float = 0.05) -> None:
        self.limit = limit
        self.name = name
        self.retry_after = retry_after
        self.held = 0

    def acquire(self, size: int) -> None:
        """Hold `size` more bytes, or raise ResourceExhausted naming the budget."""
        if self.limit and self.held + size > self.limit:
            if size > self.limit:
                raise ResourceExhausted(
                    f"request of {size} bytes exceeds {self.name} {self.limit}",
                    self.retry_after)
            raise ResourceExhausted(
                f"over budget {self.name} {self.limit}: {self.held} bytes held, "
                f"{size} more requested", self.retry_after)
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
