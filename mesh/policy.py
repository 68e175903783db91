"""Traffic policy and endpoints: what the control plane serves, as plain values. Pure."""

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

from meshserve.common.errors import InvalidArgument


def is_version(text: str) -> bool:
    """Versions are positive whole numbers written in ASCII digits."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class Shadow:
    """Mirror `percent` of a model's requests to `version`; its answers are discarded."""

    version: str
    percent: float


@dataclass(frozen=True)
class TrafficPolicy:
    """How a model's requests are shared between its versions.

    Every version listed in `weights` can be pinned (header `x-model-version: N`); requests
    that pin nothing are split by weight (percent, summing to 100). `region`, when set,
    keeps the model's traffic on endpoints of that region only, even when none is up.
    """

    model: str
    weights: dict[str, int]
    shadow: Shadow | None = None
    region: str = ""

    def __post_init__(self) -> None:
        if not self.weights:
            raise InvalidArgument(f"policy of model '{self.model}' names no version")
        for version, weight in self.weights.items():
            if not is_version(version):
                raise InvalidArgument(f"version '{version}' of model '{self.model}' is not a "
                                      "number")
            check_weight(version, weight)
        if sum(self.weights.values()) != 100:
            raise InvalidArgument(f"weights of model '{self.model}' sum to "
                                  f"{sum(self.weights.values())}, not 100")
        if self.shadow is not None:
            if self.shadow.version not in self.weights:
                raise InvalidArgument(f"shadow version '{self.shadow.version}' is not a version "
                                      f"of model '{self.model}'")
            if not 0 < self.shadow.percent <= 100:
                raise InvalidArgument("shadow percent must be above 0 and at most 100")

    @property
    def versions(self) -> list[str]:
        return sorted(self.weights, key=int)

    def with_weights(self, weights: dict[str, int]) -> "TrafficPolicy":
        self.refuse_unknown(weights)
        return replace(self, weights={v: weights.get(v, 0) for v in self.weights})

    def refuse_unknown(self, versions: Iterable[str]) -> None:
        """InvalidArgument naming the first of `versions` that this policy does not name."""
        unknown = sorted(set(versions) - set(self.weights), key=lambda v: (len(v), v))
        if unknown:
            raise InvalidArgument(f"model '{self.model}' has no version '{unknown[0]}' "
                                  f"(versions: {', '.join(self.versions)})")

    def with_versions(self, versions: Iterable[str]) -> "TrafficPolicy":
        """This policy naming `versions` too: each it did not name at weight 0 (pinnable,
        unweighted). A rollback or a new policy never removes a version the model has."""
        added = {version: 0 for version in versions if version not in self.weights}
        return replace(self, weights={**self.weights, **added}) if added else self

    def pinned(self, version: str) -> "TrafficPolicy":
        """All unpinned traffic to one version."""
        return self.with_weights({version: 100})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrafficPolicy":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> "TrafficPolicy":
        """The inverse of `asdict`: a policy kept inside another JSON document."""
        shadow = data.get("shadow")
        return cls(model=data["model"], weights=data["weights"],
                   shadow=Shadow(**shadow) if shadow else None, region=data.get("region", ""))


def parse_weights(pairs: list[str]) -> dict[str, int]:
    """`["1=90", "2=10"]` → `{"1": 90, "2": 10}`."""
    weights = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not is_version(version) or not (weight.isascii() and weight.isdigit()):
            raise InvalidArgument(f"'{pair}' is not VERSION=WEIGHT (for example 1=90)")
        if version in weights:
            raise InvalidArgument(f"version '{version}' is given twice ('{pair}'): give each "
                                  "version once")
        weights[version] = int(weight)
        check_weight(version, weights[version])  # as read: past 2^32 it could not travel
    return weights


# What a locality region may be in Istio and Kubernetes: a label value (the node label
# topology.kubernetes.io/region), so no '/', '*' or spaces.
_REGION = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def check_region(region: str) -> str:
    """`region` when it can name a locality (Istio's, the control plane's); InvalidArgument
    otherwise. One check for `traffic region` and `traffic render --istio`."""
    if not (isinstance(region, str) and _REGION.fullmatch(region) and len(region) <= 63):
        shown = f"{region[:40]!r}… ({len(region)} characters)" if len(region) > 63 else (
            repr(region))
        raise InvalidArgument(f"region {shown} is not a locality region name (at most 63 "
                              "letters, digits, '-', '_' or '.', starting and ending with a "
                              "letter or digit; for example eu-west1)")
    return region


def check_weight(version: str, weight: object) -> None:
    """InvalidArgument unless `weight` is a whole percent, 0 to 100."""
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
        raise InvalidArgument(f"weight {weight} of version '{version}' is not between 0 and "
                              "100")


@dataclass(frozen=True)
class Endpoint:
    """A batcher serving one model version, and where it runs."""

    model: str
    version: str
    address: str
    region: str = "local"
    zone: str = ""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class MeshState:
    """Everything the control plane serves: one policy per model and the endpoints."""

    policies: dict[str, TrafficPolicy] = field(default_factory=dict)
    endpoints: tuple[Endpoint, ...] = ()

    def endpoints_of(self, model: str, version: str) -> list[Endpoint]:
        return [e for e in self.endpoints if e.model == model and e.version == version]
