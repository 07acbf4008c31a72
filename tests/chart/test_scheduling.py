"""GPUs, tolerations, node selectors, affinity and resources."""

from __future__ import annotations

from .support import container, find, needs_helm, pod_spec, render

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# GPU


def test_gpu_off_by_default(default_docs: list[dict]) -> None:
    sts = find(default_docs, "StatefulSet")
    c = container(sts)
    assert c["image"] == "local/fedcifar:0.1.0-cpu"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert not pod_spec(sts).get("tolerations")
    assert "runtimeClassName" not in pod_spec(sts)


def test_gpu_on(gpu_docs: list[dict]) -> None:
    sts = find(gpu_docs, "StatefulSet")
    spec = pod_spec(sts)
    c = container(sts)
    assert c["image"] == "local/fedcifar:0.1.0-cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "4Gi"  # the configured limits stay
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    # the SuperLink and the run Job stay on the CPU image without GPUs
    for kind in ("Deployment", "Job"):
        other = container(find(gpu_docs, kind))
        assert other["image"] == "local/fedcifar:0.1.0-cpu"
        assert "nvidia.com/gpu" not in other.get("resources", {}).get("limits", {})


def test_gpu_image_override_and_extra_tolerations() -> None:
    docs = render(
        "--set",
        "clients.gpu.enabled=true",
        "--set",
        "clients.gpu.image.repository=reg.example/fedcifar",
        "--set",
        "clients.gpu.image.tag=9.9-cuda",
        "--set",
        "clients.tolerations[0].key=dedicated",
        "--set",
        "clients.tolerations[0].operator=Exists",
    )
    sts = find(docs, "StatefulSet")
    assert container(sts)["image"] == "reg.example/fedcifar:9.9-cuda"
    assert [t["key"] for t in pod_spec(sts)["tolerations"]] == ["dedicated", "nvidia.com/gpu"]


def test_scheduling_values_per_component() -> None:
    args = []
    for comp in ("superlink", "clients", "run"):
        args += [
            "--set",
            f"{comp}.nodeSelector.pool={comp}",
            "--set",
            f"{comp}.tolerations[0].key={comp}",
            "--set",
            f"{comp}.tolerations[0].operator=Exists",
            "--set",
            f"{comp}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            f".nodeSelectorTerms[0].matchExpressions[0].key={comp}",
            "--set",
            f"{comp}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            f".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
            "--set",
            f"{comp}.resources.limits.cpu=3",
        ]
    docs = render(*args)
    for kind, comp in (("Deployment", "superlink"), ("StatefulSet", "clients"), ("Job", "run")):
        spec = pod_spec(find(docs, kind))
        assert spec["nodeSelector"] == {"pool": comp}
        assert spec["tolerations"][0]["key"] == comp
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == comp
        assert container(find(docs, kind))["resources"]["limits"]["cpu"] == 3
