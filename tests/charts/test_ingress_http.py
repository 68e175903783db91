"""The ingress chart's HTTP/REST port: the flag, the container and Service port `http`, the
NetworkPolicy beside gRPC, off on request; the umbrella chart renders the same."""

from tests.charts.chartlib import container, flag_values, help_flags, kubernetes_errors


def test_http_port_flag_service_and_policy(helm):
    objects = helm.render("ingress", ("ingress",), ("--set", "http.maxBodyBytes=1048576"))
    main = container(objects)
    assert flag_values(main["args"], "--http-listen") == ["0.0.0.0:8000"]
    assert flag_values(main["args"], "--http-max-body-bytes") == ["1048576"]
    known, _ = help_flags("ingress")
    assert {arg.split("=", 1)[0] for arg in main["args"] if arg.startswith("--")} <= known
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in main["ports"]
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
            "appProtocol": "https"} in objects["Service"]["spec"]["ports"]
    [public] = [rule for rule in objects["NetworkPolicy"]["spec"]["ingress"]
                if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]
    assert {"port": "http", "protocol": "TCP"} in public["ports"]
    assert "from" not in public  # the public endpoint, as gRPC
    for kind in ("Deployment", "Service", "NetworkPolicy"):
        assert kubernetes_errors(objects[kind], "1.37") == [], kind


def test_http_off(helm):
    objects = helm.render("ingress", ("ingress",), ("--set", "http.enabled=false"))
    main = container(objects)
    assert not flag_values(main["args"], "--http-listen")
    assert "http" not in [p["name"] for p in main["ports"]]
    assert "http" not in [p["name"] for p in objects["Service"]["spec"]["ports"]]


def test_umbrella_ingress_serves_http(helm):
    docs = [d for d in helm.documents("meshserve", ("meshserve-two-models",))
            if d["metadata"]["name"] == "mesh-ingress"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [main] = deployment["spec"]["template"]["spec"]["containers"]
    assert flag_values(main["args"], "--http-listen") == ["0.0.0.0:8000"]
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert "http" in [p["name"] for p in service["spec"]["ports"]]
