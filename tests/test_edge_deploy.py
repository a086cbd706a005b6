"""Kubernetes as written: the example overlay, rendered, agrees with itself and with the
README's commands (namespace, image, Secrets)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from extproc.policy import load_policy
from tests.test_deploy import BASE, DEPLOY, ROOT, built, kustomization

OVERLAY = DEPLOY / "overlays" / "example"


def readme_commands(prefix: str) -> list[list[str]]:
    """Every command line in the README's shell blocks that starts with `prefix`."""
    text = (ROOT / "README.md").read_text()
    lines = [line.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [shlex.split(line.split("#")[0]) for line in lines if line.startswith(prefix)]


def deployment() -> dict[str, Any]:
    return next(o for o in built(OVERLAY) if o["kind"] == "Deployment")


def secrets_referenced() -> dict[str, set[str]]:
    """Secret name -> keys the pods read (an empty set: every key, via envFrom)."""
    out: dict[str, set[str]] = {}
    pods = [o["spec"]["template"]["spec"] for o in built(OVERLAY) if o["kind"] == "Deployment"]
    for pod in pods:
        for v in pod.get("volumes", []):
            if "secret" in v:
                out.setdefault(v["secret"]["secretName"], set())
    for c in (c for pod in pods for c in pod["containers"]):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                out.setdefault(ref["name"], set()).add(ref["key"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                out.setdefault(e["secretRef"]["name"], set())
    return out


def test_overlay_creates_its_namespace_and_puts_everything_in_it() -> None:
    ns = kustomization(OVERLAY)["namespace"]
    objs = built(OVERLAY)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"] == [ns]
    assert {o["metadata"]["namespace"] for o in objs if o["kind"] != "Namespace"} == {ns}


def test_overlay_points_the_processor_image_at_the_image_the_readme_builds() -> None:
    (image,) = kustomization(OVERLAY)["images"]
    want = f"{image['newName']}:{image['newTag']}"
    containers = {c["name"]: c["image"] for c in deployment()["spec"]["template"]["spec"]["containers"]}
    assert containers["extproc"] == want
    built_tags = [c[c.index("-t") + 1] for c in readme_commands("docker build")]
    pushed = [c[-1] for c in readme_commands("docker push")]
    assert built_tags == pushed == [want]


def test_readme_creates_every_secret_the_pod_reads_in_the_overlays_namespace() -> None:
    ns = kustomization(OVERLAY)["namespace"]
    created: dict[str, set[str]] = {}
    for cmd in readme_commands("kubectl"):
        if "secret" in cmd and "create" in cmd:
            assert cmd[cmd.index("-n") + 1] == ns, cmd
            name = cmd[cmd.index("generic") + 1]
            created[name] = {a.split("=", 2)[1] for a in cmd if a.startswith("--from-literal=")}
    wanted = secrets_referenced()
    assert set(created) == set(wanted)
    for name, keys in wanted.items():
        assert keys <= created[name], name
    # The provider keys the deployed policy reads from the environment are all in the Secret.
    policy = load_policy([BASE / "policy"])
    env_names = {p.api_key_env for p in policy.providers.values() if p.api_key_env}
    assert env_names <= created["tollgate-provider-keys"]


def test_readme_creates_the_namespace_before_the_secrets() -> None:
    cmds = [" ".join(c) for c in readme_commands("kubectl")]
    first_secret = next(i for i, c in enumerate(cmds) if "create secret" in c)
    assert any(Path(c.split()[-1]).name == "namespace.yaml" for c in cmds[:first_secret])
