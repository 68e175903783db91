"""Model versions in the store: the registry's record of each pushed version."""

import json
from dataclasses import dataclass

from meshserve.common.errors import FailedPrecondition
from meshserve.mesh.database import require
from meshserve.mesh.store_audit import AuditChain

TABLES = ("model_versions",)


def schema() -> list[str]:
    return [
        """CREATE TABLE IF NOT EXISTS model_versions (
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            digest TEXT NOT NULL,
            signer TEXT NOT NULL,
            manifest TEXT NOT NULL,
            pushed_by TEXT NOT NULL,
            pushed_at TEXT NOT NULL,
            PRIMARY KEY (name, version)
        )""",
    ]


@dataclass(frozen=True)
class ModelVersion:
    """A pushed model version in the registry: its artifact digest, signer and manifest."""

    name: str
    version: str
    digest: str
    signer: str
    manifest: str
    pushed_by: str
    pushed_at: str


class ModelVersions(AuditChain):
    """Pushed versions: immutable, each push audited."""

    def add_model_version(self, name: str, version: str, digest: str, signer: str,
                          manifest: str, actor: str, reason: str = "") -> ModelVersion:
        """Record a pushed version (pushed_at is now), audited as "model.push" in the same
        transaction. Versions are immutable: FailedPrecondition when it exists."""
        require(name=name, version=version, digest=digest, signer=signer, actor=actor)
        with self._write() as cur:
            at = self._now()
            if self._one(cur, "SELECT digest FROM model_versions WHERE name = ? AND "
                              "version = ?", (name, version)):
                raise FailedPrecondition(f"model '{name}' version {version} is already in the "
                                         "registry; versions are immutable, push a new one")
            row = ModelVersion(name, version, digest, signer, manifest, actor, at)
            self._exec(cur, "INSERT INTO model_versions (name, version, digest, signer, "
                            "manifest, pushed_by, pushed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, version, digest, signer, manifest, actor, at))
            self._append(cur, at, actor, "model.push", f"{name}/{version}", "",
                         json.dumps({"digest": digest, "signer": signer}, sort_keys=True),
                         reason)
        return row

    def model_versions(self, name: str = "") -> list[ModelVersion]:
        """Pushed versions (of `name`, or all), by name then version number."""
        with self._read() as cur:
            rows = self._exec(cur, "SELECT name, version, digest, signer, manifest, pushed_by, "
                                   "pushed_at FROM model_versions").fetchall()
        found = [ModelVersion(*row) for row in rows if not name or row[0] == name]
        return sorted(found, key=lambda v: (v.name, int(v.version) if v.version.isdigit()
                                            else 0, v.version))
