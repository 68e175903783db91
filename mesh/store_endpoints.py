"""Endpoints in the store: which address serves which model version, in which region and
zone."""

import json
from dataclasses import asdict
from typing import Any

from meshserve.common.errors import InvalidArgument, NotFound
from meshserve.mesh.database import require
from meshserve.mesh.policy import Endpoint
from meshserve.mesh.store_audit import AuditChain

TABLES = ("endpoints",)


def schema() -> list[str]:
    return [
        """CREATE TABLE IF NOT EXISTS endpoints (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            address TEXT NOT NULL,
            region TEXT NOT NULL,
            zone TEXT NOT NULL,
            PRIMARY KEY (model, version, address)
        )""",
    ]


class Endpoints(AuditChain):
    """Endpoints, audited as they are added, changed and removed."""

    def put_endpoint(self, endpoint: Endpoint, actor: str, reason: str = "") -> None:
        """Add or update the endpoint (key: model, version, address), audited as
        "endpoint.add" (`before` is the old row on an update). Putting an endpoint that is
        already stored unchanged does nothing and records nothing, so re-registrations do
        not flood the audit log."""
        if not isinstance(endpoint, Endpoint):
            raise InvalidArgument(f"expected an Endpoint, got {type(endpoint).__name__}")
        require(actor=actor, model=endpoint.model, version=endpoint.version,
                 address=endpoint.address)
        _check_address(endpoint)
        after = _endpoint_json(endpoint)
        with self._write() as cur:
            at = self._now()
            existing = self._endpoint(cur, endpoint.model, endpoint.version, endpoint.address)
            before = _endpoint_json(existing) if existing else ""
            if before == after:
                return
            self._exec(cur, "INSERT INTO endpoints (model, version, address, region, zone) "
                            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, version, address) "
                            "DO UPDATE SET region = excluded.region, zone = excluded.zone",
                       (endpoint.model, endpoint.version, endpoint.address, endpoint.region,
                        endpoint.zone))
            self._append(cur, at, actor, "endpoint.add", _endpoint_subject(endpoint), before,
                         after, reason)

    def remove_endpoint(self, model: str, version: str, address: str, actor: str,
                        reason: str = "") -> None:
        """Remove the endpoint, audited as "endpoint.remove"; NotFound when absent."""
        require(actor=actor)
        with self._write() as cur:
            at = self._now()
            existing = self._endpoint(cur, model, version, address)
            if existing is None:
                raise NotFound(f"no endpoint of model '{model}' version '{version}' at "
                               f"'{address}'")
            self._exec(cur, "DELETE FROM endpoints WHERE model = ? AND version = ? "
                            "AND address = ?", (model, version, address))
            self._append(cur, at, actor, "endpoint.remove", _endpoint_subject(existing),
                         _endpoint_json(existing), "", reason)

    def endpoints(self) -> tuple[Endpoint, ...]:
        """All endpoints, sorted by model, version (numerically) and address."""
        with self._read() as cur:
            return self._endpoints(cur)

    def _endpoint(self, cur: Any, model: str, version: str,
                  address: str) -> Endpoint | None:
        row = self._one(cur, "SELECT model, version, address, region, zone FROM endpoints "
                             "WHERE model = ? AND version = ? AND address = ?",
                        (model, version, address))
        return Endpoint(*row) if row else None

    def _endpoints(self, cur: Any) -> tuple[Endpoint, ...]:
        rows = self._exec(cur, "SELECT model, version, address, region, zone "
                               "FROM endpoints").fetchall()
        return tuple(sorted((Endpoint(*row) for row in rows), key=_endpoint_order))


def _check_address(endpoint: Endpoint) -> None:
    try:
        host, port = endpoint.host_port
    except ValueError:
        host, port = "", 0
    if not host or not 0 < port < 65536:
        raise InvalidArgument(f"endpoint address '{endpoint.address}' is not HOST:PORT")


def _endpoint_json(endpoint: Endpoint) -> str:
    return json.dumps(asdict(endpoint), sort_keys=True)


def _endpoint_subject(endpoint: Endpoint) -> str:
    return f"{endpoint.model}/{endpoint.version}/{endpoint.address}"


def _endpoint_order(endpoint: Endpoint) -> tuple:
    numeric = endpoint.version.isdigit()
    return (endpoint.model, not numeric, int(endpoint.version) if numeric else 0,
            endpoint.version, endpoint.address)

