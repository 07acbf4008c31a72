"""The run Job: its arguments and run config, its RBAC for the port-forward to the Control API, its bounds."""

from __future__ import annotations

from .support import FULLNAME, container, find, job_arg, kinds, needs_helm, pod_spec, render, run_config_of

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# the run Job


def test_run_job_defaults(default_docs: list[dict]) -> None:
    job = find(default_docs, "Job", f"{FULLNAME}-run-1")  # the release revision is part of the name
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})  # install must not wait on training
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    c = container(job)
    assert c["command"] == ["fedcifar", "submit"]
    assert job_arg(default_docs, "--superlink") == f"{FULLNAME}-superlink:8000"
    assert job_arg(default_docs, "--app") == "/app"
    assert job_arg(default_docs, "--num-partitions") == "2"
    assert job_arg(default_docs, "--timeout") == "600"
    # it waits for every client's metrics endpoint (the pod DNS names of the headless Service)
    urls = c["args"][c["args"].index("--client-metrics") + 1 :]
    assert urls == [f"http://{FULLNAME}-clients-{i}.{FULLNAME}-clients:9400/metrics" for i in range(2)]
    assert run_config_of(default_docs) == {
        "num-server-rounds": "3",
        "local-epochs": "1",
        "batch-size": "32",
        "learning-rate": "0.01",
        "momentum": "0.9",
        "partitioner": '"iid"',
        "dirichlet-alpha": "0.5",
        "fraction-train": "1.0",
        "fraction-evaluate": "0.0",
        "min-nodes": "2",
        "num-partitions": "2",
        "round-timeout": "3600.0",
        "seed": "42",
        "device": '"auto"',
        "round-retries": "2",
        "resume": "true",
        "strategy": '"fedavg"',
        "trim-beta": "0.2",
        "num-malicious-nodes": "0",
        "num-nodes-to-select": "1",
        "max-examples": "0",
        "proximal-mu": "0.01",
        "eta": "0.1",
        "server-momentum": "0.9",
        "dp": '"none"',
        "noise-multiplier": "1.0",
        "clipping-norm": "10.0",
        "dp-delta": "1e-05",
        # values since every run-config key is one (test_run_config_keys.py)
        "augment": "false",
        "weight-decay": "0.0",
        "augment-padding": '"zeros"',
        "normalize": "true",
        "beta-1": "0.9",
        "beta-2": "0.99",
        "tau": "0.001",
        "server-learning-rate": "1.0",
        "q": "0.1",
        "target-clipped-quantile": "0.5",
        "clip-norm-lr": "0.2",
        "local-epsilon": "0.5",
        "local-delta": "1e-05",
        "sensitivity": "20.0",
        "max-epsilon": "0.0",
        "stop-target-accuracy": "0.0",
        "stop-patience": "0",
        "stop-min-delta": "0.0",
        "out-dir": '"/var/lib/fedcifar/runs/revision-1"',  # per revision: a Job retry resumes the run
    }
    assert job["spec"]["backoffLimit"] == 3


def test_run_job_reaches_the_control_api_through_a_port_forward(default_docs: list[dict]) -> None:
    """The public port refuses the Control API; the Job port-forwards to Flower on the SuperLink's loopback."""
    deploy = find(default_docs, "Deployment", f"{FULLNAME}-superlink")
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert job_arg(default_docs, "--control-pod-selector") == ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    assert job_arg(default_docs, "--control-port") == "9093"
    role = find(default_docs, "Role", f"{FULLNAME}-run")
    assert role["rules"] == [  # as narrow as RBAC allows: no exec, no secrets, nothing cluster-wide
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
    ]
    binding = find(default_docs, "RoleBinding", f"{FULLNAME}-run")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{FULLNAME}-run"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULLNAME}-run", "namespace": "fl"}]
    assert not [d for d in render("--set", "run.enabled=false") if d["kind"] in ("Role", "RoleBinding")]


def test_run_job_values(run_docs: list[dict]) -> None:
    config = run_config_of(run_docs)
    assert config["num-server-rounds"] == "7"
    assert config["local-epochs"] == "2"
    assert config["batch-size"] == "64"
    assert config["learning-rate"] == "0.05"
    assert config["momentum"] == "0.0"  # floats stay TOML floats
    assert config["partitioner"] == '"dirichlet"'
    assert config["dirichlet-alpha"] == "0.1"
    assert config["fraction-evaluate"] == "0.5"
    assert config["round-timeout"] == "120.0"
    assert config["seed"] == "7"
    assert config["device"] == '"cpu"'
    assert config["min-nodes"] == "4"
    assert config["out-dir"] == '"/var/lib/fedcifar/out"'
    assert (config["strategy"], config["trim-beta"], config["max-examples"]) == ('"fedtrimmedavg"', "0.25", "12000")


def test_run_config_is_valid_toml(run_docs: list[dict]) -> None:
    import tomllib

    parsed = tomllib.loads(job_arg(run_docs, "--run-config").replace(" ", "\n"))
    assert parsed["learning-rate"] == 0.05 and isinstance(parsed["momentum"], float)
    assert parsed["num-server-rounds"] == 7 and parsed["partitioner"] == "dirichlet"


def test_run_min_nodes_and_disable() -> None:
    docs = render(
        "--set",
        "clients.replicas=3",
        "--set",
        "run.minNodes=2",
        "--set",
        "run.activeDeadlineSeconds=7200",
        "--set",
        "run.ttlSecondsAfterFinished=600",
    )
    assert run_config_of(docs)["min-nodes"] == "2"
    job = find(docs, "Job")
    assert job["spec"]["activeDeadlineSeconds"] == 7200 and job["spec"]["ttlSecondsAfterFinished"] == 600
    assert "Job" not in kinds(render("--set", "run.enabled=false"))


def test_the_run_job_is_bounded_by_default(default_docs: list[dict]) -> None:
    """3 rounds x 3600 s x (2 retries + 3) per attempt; 4 attempts of 600 s wait + that."""
    assert find(default_docs, "Job")["spec"]["activeDeadlineSeconds"] == 4 * (600 + 3 * 3600 * 5)
    assert job_arg(default_docs, "--run-timeout") == str(3 * 3600 * 5)
    fractional = render("--set", "run.roundTimeout=90.5")  # 3 x 90.5 x 5 = 1357.5, rounded up
    assert job_arg(fractional, "--run-timeout") == "1358"
    assert find(fractional, "Job")["spec"]["activeDeadlineSeconds"] == 4 * (600 + 1358)
