"""The control plane's durable state: policies with history, endpoints, canary records, the
model registry's versions and the audit log, in one database in the data directory, so a
restarted control plane serves the same routes.

`Store` is one connection (`meshserve.mesh.database`: SQLite or PostgreSQL, transactions,
backup and restore of every table) and one module per thing it stores, each a layer of the
class that adds its tables and methods:

    store_audit      the audit chain            every write below appends to it
    store_policies   traffic policies           an undo stack of policy history
    store_canaries   canary records             a canary's policies join that history
    store_endpoints  endpoints
    store_models     pushed model versions

Each public method is one transaction: the change and its audit entry commit together.
"""

from meshserve.mesh import (
    store_audit,
    store_canaries,
    store_endpoints,
    store_models,
    store_policies,
)
from meshserve.mesh.policy import MeshState
from meshserve.mesh.store_canaries import Canaries
from meshserve.mesh.store_endpoints import Endpoints
from meshserve.mesh.store_models import ModelVersions

# Every table of the state, each before the tables whose foreign keys name it: the order in
# which a backup exports them and a restore fills them (`export_tables`, `import_tables`).
TABLES = (*store_policies.TABLES, *store_endpoints.TABLES, *store_canaries.TABLES,
          *store_models.TABLES, *store_audit.TABLES)


class Store(Canaries, Endpoints, ModelVersions):
    """Durable control-plane state. Open with `Store.open`; use as a context manager or
    call `close()`."""

    TABLES = TABLES

    def schema(self) -> list[str]:
        return [*store_policies.schema(self._dialect), *store_endpoints.schema(),
                *store_canaries.schema(), *store_models.schema(), *store_audit.schema()]

    def state(self) -> MeshState:
        """Policies and endpoints, read in one snapshot."""
        with self._read() as cur:
            return MeshState(policies=self._policies(cur), endpoints=self._endpoints(cur))

