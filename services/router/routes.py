"""Which version serves a request: the requested one, else the model's default. Pure."""

from dataclasses import dataclass, field

from meshserve.common.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class RouteTable:
    """Batcher address per model version, and each model's default version."""

    routes: dict[str, dict[str, str]]
    defaults: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, routes: list[str], defaults: list[str] = ()) -> "RouteTable":
        """From flags: `MODEL@VERSION=HOST:PORT` routes and `MODEL=VERSION` defaults."""
        table: dict[str, dict[str, str]] = {}
        for route in routes:
            target, sep, address = route.partition("=")
            model, at, version = target.partition("@")
            if not (sep and at and model and version.isdigit() and address):
                raise InvalidArgument(f"route '{route}' is not MODEL@VERSION=HOST:PORT "
                                      "(VERSION a number)")
            table.setdefault(model, {})[version] = address
        chosen = {model: max(versions, key=int) for model, versions in table.items()}
        for default in defaults:
            model, sep, version = default.partition("=")
            if not sep or version not in table.get(model, {}):
                raise InvalidArgument(f"default version '{default}' names no route")
            chosen[model] = version
        return cls(table, chosen)

    def resolve(self, model: str, requested: str) -> str:
        versions = self.routes.get(model)
        if versions is None:
            raise NotFound(f"unknown model '{model}'")
        version = requested or self.defaults[model]
        if version not in versions:
            served = ", ".join(sorted(versions, key=int))
            raise NotFound(f"model '{model}' has no version '{version}' (served: {served})")
        return version

    def targets(self) -> list[tuple[str, str, str]]:
        return [(model, version, address) for model, versions in self.routes.items()
                for version, address in versions.items()]
