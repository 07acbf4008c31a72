"""skaffold.yaml: its build, releases, profiles and port-forwards."""

from __future__ import annotations

import re
from pathlib import Path

from .support import CHART, ROOT, find, needs_helm, render

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# skaffold.yaml


def values_path_exists(values: dict, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def releases(skaffold: dict) -> list[tuple[str, dict]]:
    found = [("(default)", r) for r in skaffold["deploy"]["helm"]["releases"]]
    for profile in skaffold.get("profiles", []):
        for release in profile.get("deploy", {}).get("helm", {}).get("releases", []):
            found.append((profile["name"], release))
    return found


def test_skaffold_structure(skaffold: dict) -> None:
    match = re.fullmatch(r"skaffold/v(\d+)(?:beta(\d+))?", skaffold["apiVersion"])
    assert match, skaffold["apiVersion"]
    major, beta = int(match.group(1)), int(match.group(2) or 10**6)
    assert (major, beta) >= (4, 13), skaffold["apiVersion"]
    assert skaffold["kind"] == "Config"
    assert "manifests" not in skaffold or not skaffold["manifests"].get("rawYaml")
    (artifact,) = skaffold["build"]["artifacts"]
    assert artifact["image"] == "local/fedcifar"
    assert artifact["context"] == "."
    assert artifact["docker"]["dockerfile"] == "images/Dockerfile"
    assert artifact["docker"]["buildArgs"]["REQUIREMENTS"] == "images/requirements-cpu.txt"
    assert "BASE_IMAGE" in artifact["docker"]["buildArgs"]
    for where, release in releases(skaffold):
        assert Path(ROOT, release["chartPath"]).resolve() == CHART, where
        templates = release["setValueTemplates"]
        assert templates["image.repository"] == "{{.IMAGE_REPO_local_fedcifar}}", where
        assert templates["image.tag"] == "{{.IMAGE_TAG_local_fedcifar}}", where
    forwards = {(f["resourceType"], f["resourceName"], f["port"]) for f in skaffold["portForward"]}
    superlink = f"{skaffold['deploy']['helm']['releases'][0]['name']}-superlink"  # release "fedcifar"
    assert {
        ("service", superlink, 8000),
        ("service", f"{superlink}-metrics", 9400),
        ("deployment", superlink, 9093),
    } <= forwards
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert {"kind", "minikube", "gpu"} <= set(profiles)
    for name in ("kind", "minikube"):
        (release,) = profiles[name]["deploy"]["helm"]["releases"]
        assert release["setValues"].get("clients.gpu.enabled", False) is False
        assert any(key.endswith("resources.requests.cpu") for key in release["setValues"]), name
    gpu = profiles["gpu"]
    cuda = [a for a in gpu["build"]["artifacts"] if a["docker"]["buildArgs"]["REQUIREMENTS"].endswith("cuda.txt")]
    assert len(cuda) == 1 and cuda[0]["docker"]["dockerfile"] == "images/Dockerfile"
    sanitized = re.sub(r"[^A-Za-z0-9]", "_", cuda[0]["image"])
    (release,) = gpu["deploy"]["helm"]["releases"]
    assert release["setValues"]["clients.gpu.enabled"] is True
    assert release["setValueTemplates"]["clients.gpu.image.repository"] == f"{{{{.IMAGE_REPO_{sanitized}}}}}"
    assert release["setValueTemplates"]["clients.gpu.image.tag"] == f"{{{{.IMAGE_TAG_{sanitized}}}}}"


def test_skaffold_values_exist_and_render(skaffold: dict, values: dict) -> None:
    for where, release in releases(skaffold):
        args = []
        for section in ("setValues", "setValueTemplates"):
            for key, value in release.get(section, {}).items():
                assert values_path_exists(values, key), f"{where}: {section} {key} is not in values.yaml"
                if section == "setValueTemplates":  # what skaffold substitutes, roughly
                    value = "skaffold/fedcifar" if "IMAGE_REPO" in value else "dev-1234"
                args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        docs = render(*args)  # the schema accepts every profile's values
        assert find(docs, "StatefulSet")


def test_the_mlflow_profile_builds_the_server_and_sets_values_that_exist(skaffold: dict, values: dict) -> None:
    (profile,) = [p for p in skaffold["profiles"] if p["name"] == "mlflow"]
    patches = {patch["path"]: patch["value"] for patch in profile["patches"]}
    assert (ROOT / patches["/build/artifacts/-"]["docker"]["dockerfile"]).is_file()
    keys = [path.rsplit("/", 1)[1] for path in patches if "/setValue" in path]
    assert "tracking.mlflow.server.enabled" in keys and all(values_path_exists(values, k) for k in keys), keys
    assert patches["/portForward/-"]["port"] == values["tracking"]["mlflow"]["server"]["port"]
