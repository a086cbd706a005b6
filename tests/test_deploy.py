"""Deployment artefacts validate without a cluster (issue 5): Kubernetes schemas, the Envoy
bootstrap inside the ConfigMap, alert rules (promtool), the dashboard's PromQL."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from extproc import metrics
from extproc.devstack import envoy_binary
from extproc.policy import load_policy
from scripts.render_deploy import envoy_yaml, prometheus_rule
from tests.conftest import Stack

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"PodMonitor", "PrometheusRule"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")


def kustomization(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((path / "kustomization.yaml").read_text()))


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge, enough for the overlay's patches (maps merge, the rest replaces)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base.get(k), v)
        return out
    return copy.deepcopy(patch)


def built(path: Path) -> list[dict[str, Any]]:
    """A small `kustomize build`: resources, generated ConfigMaps, namespace, images, patches."""
    k = kustomization(path)
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = path / res
        if target.is_dir():
            objs += built(target)
        else:
            objs += [o for o in yaml.safe_load_all(target.read_text()) if o]
    for gen in k.get("configMapGenerator", []):
        data = {Path(f).name: (path / f).read_text() for f in gen["files"]}
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        p = yaml.safe_load((path / patch["path"]).read_text())
        objs = [merge(o, p) if (o["kind"], o["metadata"]["name"]) == (p["kind"], p["metadata"]["name"]) else o for o in objs]
    for o in objs:
        if "namespace" in k and o["kind"] != "Namespace":
            o["metadata"]["namespace"] = k["namespace"]
        labels = {}
        for entry in k.get("labels", []):
            labels.update(entry["pairs"])
        o["metadata"].setdefault("labels", {}).update(labels)
    for image in k.get("images", []):
        for o in objs:
            for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objs


@pytest.mark.parametrize("where", [BASE, DEPLOY / "overlays" / "example"], ids=["base", "overlay"])
def test_every_manifest_validates_against_the_kubernetes_schemas(where: Path) -> None:
    objs = built(where)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "PodMonitor", "PrometheusRule"} <= kinds
    for o in objs:
        if o["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_overlay_sets_namespace_image_and_replicas() -> None:
    dep = next(o for o in built(DEPLOY / "overlays" / "example") if o["kind"] == "Deployment")
    assert dep["metadata"]["namespace"] == "ai-gateway" and dep["spec"]["replicas"] == 3
    images = [c["image"] for c in dep["spec"]["template"]["spec"]["containers"]]
    assert "registry.example.com/acme/tollgate-extproc:0.1.0" in images


def test_pod_runs_envoy_and_the_processor_with_probes_and_resources() -> None:
    dep = next(o for o in built(BASE) if o["kind"] == "Deployment")
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"envoy", "extproc"}
    for c in containers.values():
        assert c["readinessProbe"] and c["livenessProbe"] and c["resources"]["requests"]
    assert containers["extproc"]["readinessProbe"]["grpc"]["port"] == 50051  # the gRPC health service
    assert any(e.get("secretRef", {}).get("name") == "tollgate-provider-keys" for e in containers["extproc"]["envFrom"])
    # Envoy drains before the processor stops, and the pod waits for both.
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    stops = {n: int(c["lifecycle"]["preStop"]["exec"]["command"][-1]) for n, c in containers.items()}
    assert stops["envoy"] < stops["extproc"] < grace


def test_pod_monitor_scrapes_ports_the_pod_exposes() -> None:
    objs = built(BASE)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    ports = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    monitor = next(o for o in objs if o["kind"] == "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_envoy_bootstrap_in_the_configmap_is_rendered_from_the_policy_and_valid(tmp_path: Path) -> None:
    cm = next(o for o in built(BASE) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "tollgate-envoy")
    assert cm["data"]["envoy.yaml"] == envoy_yaml(), "stale: run `make deploy-config`"
    config = tmp_path / "envoy.yaml"
    config.write_text(cm["data"]["envoy.yaml"])
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_deploy_policy_loads_and_its_route_file_is_the_seed() -> None:
    policy = load_policy([BASE / "policy"])
    assert all(p.tls for p in policy.providers.values())
    assert (BASE / "policy" / "support_draft.yaml").read_text() == (ROOT / "extproc" / "examples" / "policy" / "support_draft.yaml").read_text()


def test_prometheus_rule_is_rendered_from_the_rules_file() -> None:
    assert (BASE / "prometheusrule.yaml").read_text() == prometheus_rule(), "stale: run `make deploy-config`"


@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus" / "tollgate-rules.yaml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(["promtool", "test", "rules", "rules-test.yaml"], cwd=ROOT / "tests" / "prometheus",
                          capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "tollgate-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


@needs_promtool
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr{i}", "expr": e}
                                                         for i, e in enumerate(dashboard_exprs())]}]}
    f = tmp_path / "dashboard-rules.yaml"
    f.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_names_only_metrics_that_exist(stack: Stack, customer: str) -> None:
    """tollgate_* names against the processor's metrics module, envoy_* against a real Envoy
    (after one request, since Envoy lists a histogram once it has a sample)."""
    import urllib.request

    _, secret = stack.create_key(customer)
    stack.client(secret).chat.completions.create(model="support_draft", messages=[{"role": "user", "content": "hi"}])

    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.envoy.admin_port}/stats/prometheus", timeout=5) as r:
        envoy_names = {line.split("{")[0].split(" ")[0] for line in r.read().decode().splitlines() if line and not line.startswith("#")}
    for expr in dashboard_exprs():
        bare = re.sub(r"\{[^}]*\}", "", expr)  # drop label matchers
        for name in set(re.findall(r"\b((?:tollgate|envoy)_[a-z_]+)\b", bare)):
            if name.startswith("tollgate_"):
                assert re.sub(r"_(total|bucket)$", "", name) in exported, f"{name} is not exported by the processor"
            else:
                assert name in envoy_names, f"{name} is not in Envoy's stats"


def test_billing_runs_the_admin_api_behind_its_service_and_the_exporter_beside_it() -> None:
    objs = built(BASE)
    deps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    admin = deps["tollgate-admin"]["spec"]["template"]
    exporter = deps["tollgate-exporter"]["spec"]["template"]
    (admin_c,) = admin["spec"]["containers"]
    (export_c,) = exporter["spec"]["containers"]
    assert admin_c["args"][:1] == ["admin"] and "--token-file" in admin_c["args"]
    assert admin_c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert export_c["args"][:2] == ["usage", "export"] and "--once" not in export_c["args"]
    for c in (admin_c, export_c):
        env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert env == {"TOLLGATE_REDIS_URL": "tollgate-redis", "TOLLGATE_LEDGER_URL": "tollgate-ledger"}
    service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "tollgate-admin")
    assert service["spec"]["selector"].items() <= admin["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in admin_c["ports"]}
    # The gateway's Service must not send client traffic to the admin pods, nor the reverse.
    gateway = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "tollgate")
    assert not gateway["spec"]["selector"].items() <= admin["metadata"]["labels"].items()
