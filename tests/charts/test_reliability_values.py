"""Reliability values of the charts: the batcher's overload, failover and response cache (its
Redis password from a Secret, never a plain value), and the ingress's byte budget, audit of
denied calls and asynchronous API."""

import pytest

from tests.charts.chartlib import container, flag_values, help_flags, kubernetes_errors, pod_spec

BATCHER = ("batcher", "batcher-reliability")
INGRESS = ("ingress", "ingress-async")
UMBRELLA = ("meshserve-two-models", "meshserve-secured")
KUBERNETES = ["1.27", "1.30", "1.37"]
BATCHER_FLAGS = {"--max-queue-bytes", "--stall-timeout", "--eject-after", "--ejection-seconds",
                 "--cache-bytes", "--cache-redis", "--cache-ttl"}
INGRESS_FLAGS = {"--max-inflight-bytes", "--control-plane", "--async-store",
                 "--async-concurrency", "--async-max-pending", "--group-linger-ms"}
PASSWORD_ENV = "MESHSERVE_BATCHER_REDIS_PASSWORD"


def flags(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args}


def assert_real_flags(service: str, args: list[str]) -> None:
    known, required = help_flags(service)
    assert flags(args) <= known, f"not flags of meshserve {service}: {flags(args) - known}"
    assert required <= flags(args)


def env_by_name(main: dict) -> dict[str, dict]:
    return {e["name"]: e for e in main["env"]}


# --- batcher -----------------------------------------------------------------------------------

def test_batcher_overload_failover_and_cache_flags(helm):
    objects = helm.render("batcher", BATCHER)
    main = container(objects)
    args = main["args"]
    expected = {"--max-queue-bytes": "268435456", "--stall-timeout": "2.5", "--eject-after": "3",
                "--ejection-seconds": "10", "--cache-bytes": "67108864",
                "--cache-redis": "redis://redis.cache.svc:6379/0", "--cache-ttl": "600"}
    assert {flag: flag_values(args, flag) for flag in expected} == {
        flag: [value] for flag, value in expected.items()}
    assert flag_values(args, "--allow-callers") == ["router,control-plane"]
    assert_real_flags("batcher", args)
    for version in KUBERNETES:
        assert kubernetes_errors(objects["Deployment"], version) == [], version


def test_batcher_redis_password_comes_from_a_secret(helm):
    main = container(helm.render("batcher", BATCHER))
    assert env_by_name(main)[PASSWORD_ENV] == {
        "name": PASSWORD_ENV,
        "valueFrom": {"secretKeyRef": {"name": "batcher-redis", "key": "redis-password"}}}
    assert not any("password" in arg.lower() for arg in main["args"])


def test_batcher_keeps_the_service_defaults_unless_set(helm):
    main = container(helm.render("batcher"))
    assert not flags(main["args"]) & BATCHER_FLAGS
    assert PASSWORD_ENV not in env_by_name(main)


def test_batcher_cache_without_redis(helm):
    main = container(helm.render("batcher", BATCHER, extra=(
        "--set", "cache.redis.url=", "--set", "cache.redis.passwordSecret=")))
    assert flag_values(main["args"], "--cache-bytes") == ["67108864"]
    assert not flags(main["args"]) & {"--cache-redis", "--cache-ttl"}
    assert PASSWORD_ENV not in env_by_name(main)


@pytest.mark.parametrize("url", [
    "redis://:hunter2@redis:6379/0", "redis://default:hunter2@redis:6379",
    "rediss://redis:6380/0?password=hunter2"], ids=["password", "user-password", "query"])
def test_batcher_refuses_a_password_in_the_redis_url(helm, url):
    done = helm.template(BATCHER[0], *BATCHER, extra=("--set", f"cache.redis.url={url}"))
    assert done.returncode != 0
    assert "cache.redis.url must not carry a password" in done.stderr
    assert "hunter2" not in done.stdout


def test_batcher_password_secret_needs_a_redis_url(helm):
    done = helm.template(BATCHER[0], *BATCHER, extra=("--set", "cache.redis.url="))
    assert done.returncode != 0
    assert "cache.redis.passwordSecret needs cache.redis.url" in done.stderr


@pytest.mark.parametrize(("setting", "field"), [
    ("failover.ejectAfter=0", "/failover/ejectAfter"),
    ("failover.stallTimeoutSeconds=-1", "/failover/stallTimeoutSeconds"),
    ("overload.maxQueueBytes=lots", "/overload/maxQueueBytes"),
    ("cache.redis.url=http://redis:6379", "/cache/redis/url"),
    ("cache.redis.passwordSecret=Bad_Name", "/cache/redis/passwordSecret"),
    ("cache.redis.ttl=60", "ttl"),
])
def test_batcher_schema_refuses(helm, setting, field):
    done = helm.template(BATCHER[0], *BATCHER, extra=("--set", setting))
    assert done.returncode != 0
    assert field in done.stderr, done.stderr


# --- ingress -----------------------------------------------------------------------------------

def test_ingress_async_store_budget_and_audit(helm):
    objects = helm.render("ingress", INGRESS)
    main = container(objects)
    args = main["args"]
    assert flag_values(args, "--max-inflight-bytes") == ["134217728"]
    assert flag_values(args, "--control-plane") == ["mesh-control-plane:7005"]
    assert flag_values(args, "--async-store") == ["/var/lib/meshserve/async/async.db"]
    assert flag_values(args, "--async-concurrency") == ["16"]
    assert flag_values(args, "--async-max-pending") == ["5000"]
    assert_real_flags("ingress", args)
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert mounts["async"] == {"name": "async", "mountPath": "/var/lib/meshserve/async"}
    assert volumes["async"] == {"name": "async", "emptyDir": {"sizeLimit": "1Gi"}}
    assert "PersistentVolumeClaim" not in objects
    for version in KUBERNETES:
        assert kubernetes_errors(objects["Deployment"], version) == [], version


def test_ingress_keeps_the_service_defaults_unless_set(helm):
    objects = helm.render("ingress")
    assert not flags(container(objects)["args"]) & INGRESS_FLAGS
    assert "async" not in {v["name"] for v in pod_spec(objects)["volumes"]}


def test_ingress_unbounded_budget_is_zero_not_omitted(helm):
    main = container(helm.render("ingress", INGRESS, extra=("--set", "maxInflightBytes=0")))
    assert flag_values(main["args"], "--max-inflight-bytes") == ["0"]


@pytest.mark.parametrize("value", ["0", "0.5"])
def test_ingress_group_linger_is_passed_as_set(helm, value):
    main = container(helm.render("ingress", INGRESS,
                                 extra=("--set-json", f"groupLingerMs={value}")))
    assert flag_values(main["args"], "--group-linger-ms") == [value]


def test_ingress_async_store_on_an_existing_claim(helm):
    objects = helm.render("ingress", INGRESS, extra=(
        "--set", "async.existingClaim=ingress-async", "--set", "replicas=1",
        "--set", "strategy.type=Recreate"))
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["async"] == {"name": "async",
                                "persistentVolumeClaim": {"claimName": "ingress-async"}}
    assert objects["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("extra", [
    ("--set", "replicas=2", "--set", "strategy.type=Recreate"),
    ("--set", "replicas=1"),
    ("--set", "replicas=1", "--set", "strategy.type=Recreate", "--set", "autoscaling.enabled=true"),
], ids=["two-replicas", "rolling-update", "autoscaling"])
def test_ingress_async_claim_needs_one_writer(helm, extra):
    done = helm.template(INGRESS[0], *INGRESS, extra=(
        "--set", "async.existingClaim=ingress-async", *extra))
    assert done.returncode != 0
    assert "async.existingClaim holds one SQLite store" in done.stderr


@pytest.mark.parametrize(("setting", "field"), [
    ("audit.controlPlane.target=control-plane", "/audit/controlPlane/target"),
    ("async.concurrency=0", "/async/concurrency"),
    ("async.storeFile=a/b.db", "/async/storeFile"),
    ("maxInflightBytes=-1", "/maxInflightBytes"),
    ("groupLingerMs=-1", "/groupLingerMs"),
])
def test_ingress_schema_refuses(helm, setting, field):
    done = helm.template(INGRESS[0], *INGRESS, extra=("--set", setting))
    assert done.returncode != 0
    assert field in done.stderr, done.stderr


# --- lint --------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [BATCHER, INGRESS], ids=["batcher", "ingress"])
def test_values_lint(helm, values):
    done = helm.lint(values[0], *values)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the umbrella chart ----------------------------------------------------------------------

def test_umbrella_passes_batcher_and_ingress_values_through(helm):
    workloads = {d["metadata"]["name"]: d for d in helm.documents("meshserve", UMBRELLA)
                 if d["kind"] in ("Deployment", "StatefulSet")}
    for name in ("mesh-mlp-1-batcher", "mesh-cnn-1-batcher"):
        [main] = workloads[name]["spec"]["template"]["spec"]["containers"]
        assert flag_values(main["args"], "--cache-redis") == ["redis://redis.cache.svc:6379/0"]
        assert env_by_name(main)[PASSWORD_ENV]["valueFrom"] == {
            "secretKeyRef": {"name": "batcher-redis", "key": "password"}}
        assert_real_flags("batcher", main["args"])
    # Only the model that overrides failover gets those flags.
    [mlp] = workloads["mesh-mlp-1-batcher"]["spec"]["template"]["spec"]["containers"]
    [cnn] = workloads["mesh-cnn-1-batcher"]["spec"]["template"]["spec"]["containers"]
    assert not flags(mlp["args"]) & {"--stall-timeout", "--eject-after", "--ejection-seconds"}
    assert [flag_values(cnn["args"], f) for f in ("--stall-timeout", "--eject-after",
                                                  "--ejection-seconds")] == [["3"], ["1"], ["5"]]
    [ingress] = workloads["mesh-ingress"]["spec"]["template"]["spec"]["containers"]
    assert flag_values(ingress["args"], "--async-store") == ["/var/lib/meshserve/async/async.db"]
    assert flag_values(ingress["args"], "--async-concurrency") == ["16"]
    assert flag_values(ingress["args"], "--max-inflight-bytes") == ["134217728"]
    assert_real_flags("ingress", ingress["args"])


def test_umbrella_refuses_a_partial_block_in_a_model_override(helm):
    """A model's batcher block replaces the section's whole block: a partial one would lose
    the other keys, so the schema asks for every key."""
    done = helm.template("meshserve", *UMBRELLA, extra=(
        "--set-json", 'models[1].batcher.failover={"ejectAfter":2}'))
    assert done.returncode != 0
    assert "/models/1/batcher/failover" in done.stderr
    assert "stallTimeoutSeconds" in done.stderr
