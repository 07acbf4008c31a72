"""values.schema.json and the chart's own checks: values that must be refused, naming the problem."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from .support import CERT_MANAGER_API, CHART, INSECURE_ARGS, SITE_ARGS, needs_helm, render, render_error

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# values that must be rejected, with a message that names the problem


def test_schema_is_closed() -> None:
    """Every object the chart defines rejects unknown keys (Kubernetes pass-through objects aside)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    open_objects = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(schema, "")
    assert not open_objects
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: dict, prefix: str = ""):
        for key, child in node.items():
            yield f"{prefix}{key}", child
            if isinstance(child, dict) and f"{prefix}{key}" not in PASS_THROUGH:
                yield from leaves(child, f"{prefix}{key}.")

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    for path, _ in leaves(values):  # every value has a schema entry
        node = schema
        for part in path.split("."):
            properties = resolve(node).get("properties", {})
            assert part in properties, f"values.yaml key {path} is missing from values.schema.json"
            node = properties[part]


PASS_THROUGH = {
    "podSecurityContext",
    "securityContext",
    "extraEnv",
    *(
        f"{c}.{k}"
        for c in ("superlink", "clients", "run")
        for k in ("resources", "nodeSelector", "affinity", "podAnnotations", "podLabels", "extraEnv")
    ),
    "superlink.proxy.resources",
    "tracking.mlflow.server.resources",
    "superlink.service.annotations",
    "superlink.persistence.annotations",
    "serviceAccount.annotations",
    "run.extraConfig",
    "metrics.serviceMonitor.additionalLabels",
    "metrics.podMonitor.additionalLabels",
    "dashboards.annotations",
    "tests.resources",
    "tls.certManager.issuerRef",
    "superlink.ingress.annotations",
}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--set", "clients.replica=3"), r"clients: Additional property replica is not allowed"),  # unknown key
        (("--set", "superlink.bogus=1"), r"superlink: Additional property bogus is not allowed"),
        (("--set", "nope=1"), r"Additional property nope is not allowed"),
        (("--set", "run.rounds=three"), r"run\.rounds: Invalid type\. Expected: integer, given: string"),  # wrong type
        (("--set-string", "clients.replicas=2"), r"clients\.replicas: Invalid type\. Expected: integer"),
        (("--set", "clients.gpu.enabled=yes"), r"clients\.gpu\.enabled: Invalid type\. Expected: boolean"),
        (("--set", "superlink.nodeSelector.disk=1"), r"superlink\.nodeSelector\.disk: Invalid type\. Expected: string"),
        (("--set", "run.learningRate=fast"), r"run\.learningRate: Does not match pattern"),
        (("--set", "clients.replicas=0"), r"clients\.replicas: Must be greater than or equal to 1"),
        (("--set", "run.partitioner=shards"), r'run\.partitioner must be one of the following: "iid", "dirichlet"'),
        (("--set", "data.source=s3"), r'data\.source must be one of the following: "hub", "volume"'),
        (("--set", "run.device=tpu"), r"run\.device must be one of the following"),
        (("--set", "run.learningRate=0"), r"run\.learningRate: Must be greater than 0"),
        (("--set", "tls.enabled=yes"), r"tls\.enabled: Invalid type\. Expected: boolean"),
        (("--set", "tls.certManager.issuerRef.kind=Vault"), r"kind must be one of the following"),
        (("--set", "tls.extraDnsNames[0]=Not A Name"), r"tls\.extraDnsNames\.0: Does not match pattern"),
        (("--set", "networkPolicy.ingress=1"), r"networkPolicy: Additional property ingress is not allowed"),
        (("--set", "supernodeAuth.keys=1"), r"supernodeAuth: Additional property keys is not allowed"),
        (("--set", "clients.site=Hospital_A"), r"clients\.site: Does not match pattern"),
        (("--set", "clients.superlink.address=https://link"), r"clients\.superlink\.address: Does not match pattern"),
        (
            ("--set", "clients.partitions.split=random"),
            r'clients\.partitions\.split must be one of the following: "global", "site"',
        ),
        (("--set", "clients.partitions.offset=-1"), r"clients\.partitions\.offset: Must be greater than or equal to 0"),
        (("--set", "run.numPartitions=0"), r"run\.numPartitions: Must be greater than or equal to 1"),
        (("--set", "run.strategy=fedsgd"), r'run\.strategy must be one of the following: "fedavg", "fedprox"'),
        (("--set", "run.dp=central"), r'run\.dp must be one of the following: "none", "server-fixed"'),
        (("--set", "run.noiseMultiplier=0"), r"run\.noiseMultiplier: Must be greater than 0"),
        (("--set", "run.dpDelta=1"), r"run\.dpDelta: Must be less than 1"),
        (("--set", "run.serverMomentum=1"), r"run\.serverMomentum: Must be less than 1"),
        (("--set", "run.proximalMu=-0.1"), r"run\.proximalMu: Must validate at least one schema"),
        (("--set", "run.numMaliciousNodes=-1"), r"run\.numMaliciousNodes: Must be greater than or equal to 0"),
        (("--set", "run.maxExamples=-1"), r"run\.maxExamples: Must be greater than or equal to 0"),
        # what would open Flower's APIs beside the proxy and the Fleet guard
        (("--set", "superlink.extraArgs[0]=--host", "--set", "superlink.extraArgs[1]=0.0.0.0"), r"extraArgs\.0"),
        (("--set", "superlink.extraArgs[0]=--fleet-api-address=0.0.0.0:9092"), r"extraArgs\.0"),
        (("--set", "superlink.extraArgs[0]=--control-api-address"), r"extraArgs\.0"),
        (("--set", "superlink.extraArgs[0]=--ho=0.0.0.0"), r"extraArgs\.0"),  # Flower's parser takes abbreviations
        (("--set", "superlink.extraEnv.FLWR_INTERNAL_GRPC_FLEET_API=1"), r"FLWR_INTERNAL_GRPC_FLEET_API"),
        (("--set", "extraEnv.FLWR_INTERNAL_GRPC_CONTROL_API=1"), r"FLWR_INTERNAL_GRPC_CONTROL_API"),
        (("--set", "superlink.fleetGuard.maxReplyBytes=0"), r"maxReplyBytes: Must be greater than or equal to 1"),
        # names, labels, annotations and quantities the chart renders (more in test_free_strings_are_refused_or_inert)
        (("--set", "imagePullSecrets[0].name=Reg Cred"), r"imagePullSecrets\.0\.name: Does not match pattern"),
        (("--set", "superlink.podLabels.team=a b"), r"superlink\.podLabels\.team: Does not match pattern"),
        (("--set", "superlink.podAnnotations.bad key=x"), r'superlink\.podAnnotations: Property name of "bad key"'),
        (("--set", "clients.resources.limits.memory=4 GiB"), r"clients\.resources\.limits\.memory: Does not match"),
        (("--set", "tls.certManager.issuerRef.group=x_y"), r"tls\.certManager\.issuerRef\.group: Does not match"),
        (("--set", "clients.gpu.resourceName=a/b/c"), r"clients\.gpu\.resourceName: Does not match pattern"),
        (("--set", "superlink.proxy.maxBodySize=6m;x"), r"superlink\.proxy\.maxBodySize: Does not match pattern"),
    ],
)
def test_schema_rejects(args: tuple[str, ...], expected: str) -> None:
    error = render_error(*args)
    assert "values don't meet the specifications of the schema" in error, error
    assert re.search(expected, error, re.IGNORECASE | re.DOTALL), error


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--set", "data.source=volume"), "neither data.volume.existingClaim nor data.volume.hostPath is set"),
        (
            ("--set", "data.source=volume", "--set", "data.volume.existingClaim=a", "--set", "data.volume.hostPath=/b"),
            "data.volume.existingClaim and data.volume.hostPath are both set",
        ),
        (("--set", "run.minNodes=3"), "run.minNodes (3) is larger than the federation's node slots (2)"),
        (("--set", "run.extraConfig.seed=1"), "run.extraConfig.seed repeats a run-config key"),
        (("--set", "run.extraConfig.resume=false"), "run.extraConfig.resume repeats a run-config key"),
        (("--set", "run.extraConfig.round-retries=5"), "run.extraConfig.round-retries repeats a run-config key"),
        (("--set", "run.extraConfig.strategy=krum"), "run.extraConfig.strategy repeats a run-config key"),
        (("--set", "run.extraConfig.noise-multiplier=2"), "run.extraConfig.noise-multiplier repeats a run-config key"),
        (("--set", "run.trimBeta=0.5"), "run.trimBeta is the fraction strategy fedtrimmedavg cuts at each end"),
        (("--set", "metrics.port=9094"), "clients.port and metrics.port are both 9094"),
        (("--set", "superlink.persistence.existingClaim=x"), "superlink.persistence.enabled is false"),
        (("--set", "image.tag=latest"), 'image.tag and clients.gpu.image.tag must be fixed versions, not "latest"'),
        (("--set", "run.fractionTrain=1.5"), "run.fractionTrain is a fraction of the clients and must lie between 0"),
        (("--set", "run.dirichletAlpha=0.0"), "run.dirichletAlpha must be greater than 0"),
        (("--set", "tls.enabled=false"), "supernodeAuth.enabled needs tls.enabled"),
        (
            ("--set", "supernodeAuth.existingSecret=keys"),
            "supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret go together",
        ),
        (("--set", "metrics.port=9093"), "metrics.port and superlink.controlPort are both 9093"),
        (("--set", "superlink.controlPort=8000"), "superlink.controlPort and superlink.port are both 8000"),
        # the cross-silo shapes
        (
            ("--set", "superlink.enabled=false", "--set", "clients.enabled=false"),
            "superlink.enabled and clients.enabled are both false: this release would hold nothing",
        ),
        (
            ("--set", "superlink.enabled=false"),
            "a site release dials a remote SuperLink; set clients.superlink.address",
        ),
        (
            ("--set", "superlink.enabled=false", "--set", "clients.superlink.address=link:30800"),
            "clients.superlink.caSecret is empty: create a Secret holding the remote SuperLink's ca.crt",
        ),
        (("--set", "clients.superlink.address=link:30800"), "set superlink.enabled=false for a site release"),
        (("--set", "clients.enabled=false"), "a server release states the federation's node slots"),
        (
            ("--set", "clients.partitions.offset=1"),
            "clients.partitions.offset (1) + clients.replicas (2) is beyond clients.partitions.total (2)",
        ),
        (
            ("--set", "clients.partitions.total=4", "--set", "run.numPartitions=3"),
            "run.numPartitions (3) differs from clients.partitions.total (4)",
        ),
        (("--set", "superlink.ingress.enabled=true"), "superlink.ingress.enabled needs superlink.ingress.host"),
        # the same as the schema refuses, for a helm run without it
        (
            ("--skip-schema-validation", "--set", "superlink.extraArgs[0]=--host=0.0.0.0"),
            "superlink.extraArgs holds --host=0.0.0.0: Flower would serve its APIs beside the proxy",
        ),
        (
            ("--skip-schema-validation", "--set", "extraEnv.FLWR_INTERNAL_GRPC_FLEET_API=1"),
            "extraEnv sets FLWR_INTERNAL_GRPC_FLEET_API: Flower would open its legacy gRPC API",
        ),
        (
            ("--skip-schema-validation", "--set", "superlink.extraEnv.FLWR_INTERNAL_GRPC_CONTROL_API=1"),
            "superlink.extraEnv sets FLWR_INTERNAL_GRPC_CONTROL_API",
        ),
        (  # written into nginx.conf, where quoting would not help
            ("--skip-schema-validation", "--set", "superlink.proxy.maxBodySize=6m;\n  evil on"),
            'superlink.proxy.maxBodySize must be an nginx size (bytes, or a number with k or m, e.g. 6m), got "6m;\\n',
        ),
        (
            (
                "--set",
                "superlink.ingress.enabled=true",
                "--set",
                "superlink.ingress.host=fl.example.org",
                "--set",
                "tls.enabled=false",
                "--set",
                "supernodeAuth.enabled=false",
            ),
            "superlink.ingress.enabled needs tls.enabled",
        ),
    ],
)
def test_contradictory_values_fail(args: tuple[str, ...], expected: str) -> None:
    error = render_error(*args)
    assert expected in error, error


def test_helm_generated_keys_can_be_refused() -> None:
    """allowHelmGeneratedKeys=false: a release for which Helm would generate the CA key or SuperNode
    private keys (and keep them in every release revision) fails, naming what to set instead; keys
    from Secrets of their own or from cert-manager pass."""
    refuse = ("--set", "allowHelmGeneratedKeys=false")
    error = render_error(*refuse)
    assert "allowHelmGeneratedKeys is false" in error and "sh.helm.release.v1." in error, error
    assert "set tls.existingSecret" in error and "cert-manager" in error, error
    assert "set supernodeAuth.existingSecret and supernodeAuth.existingPublicKeysSecret" in error, error
    error = render_error(*refuse, "--set", "tls.existingSecret=my-tls")  # the SuperNode keys alone
    assert "supernodeAuth.existingSecret" in error and "set tls.existingSecret" not in error, error
    own_keys = ("--set", "supernodeAuth.existingSecret=k", "--set", "supernodeAuth.existingPublicKeysSecret=p")
    error = render_error(*refuse, *own_keys)  # the CA alone
    assert "set tls.existingSecret" in error and "supernodeAuth.existingSecret" not in error, error
    for args in (
        ("--set", "tls.existingSecret=my-tls", *own_keys),
        ("--api-versions", CERT_MANAGER_API, *own_keys),  # cert-manager keeps the CA key in its own Secret
        INSECURE_ARGS,
        ("--set", "clients.enabled=false", "--set", "run.numPartitions=2", "--set", "tls.existingSecret=my-tls"),
        tuple(a for a in SITE_ARGS) + own_keys,
    ):
        docs = render(*refuse, *args)
        secrets = [d for d in docs if d["kind"] == "Secret"]
        assert not secrets, (args, [d["metadata"]["name"] for d in secrets])
