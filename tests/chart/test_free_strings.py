"""Free strings: refused by the schema where their field cannot hold them, inert where rendered."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from .support import CERT_MANAGER_API, MONITORING_API, needs_helm, render, render_error

pytestmark = needs_helm


# ---------------------------------------------------------------------------------------------
# free strings: refused by the schema where their field cannot hold them, inert where rendered

# Three release shapes that between them render every free string of the chart, each value set to a
# benign placeholder of its own (found verbatim in the render, and in no other placeholder).
SHAPES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "release": (
        (
            *("--api-versions", MONITORING_API, "--api-versions", CERT_MANAGER_API),
            *("--set", "data.source=volume", "--set", "clients.gpu.enabled=true"),
            *("--set", "superlink.ingress.enabled=true", "--set", "superlink.persistence.enabled=true"),
            *("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"),
            *("--set", "tls.certManager.issuerRef.kind=Issuer"),
        ),
        {
            "nameOverride": "zq-name",
            "fullnameOverride": "zq-full",
            "image.repository": "zq/image",
            "image.tag": "zq-tag",
            "serviceAccount.name": "zq-account",
            "superlink.priorityClassName": "zq-slprio",
            "superlink.podLabels.zqlabel": "zq-labelvalue",
            "superlink.ingress.className": "zq-ingclass",
            "superlink.ingress.host": "zq-host.example",
            "superlink.persistence.storageClassName": "zq-storage",
            "tls.clusterDomain": "zq-domain.local",
            "tls.certManager.issuerRef.name": "zq-issuer",
            "tls.certManager.duration": "4217h",
            "supernodeAuth.existingSecret": "zq-privkeys",
            "supernodeAuth.existingPublicKeysSecret": "zq-pubkeys",
            "supernodeAuth.siteKeysSecret": "zq-sitekeys",
            "clients.priorityClassName": "zq-clprio",
            "clients.gpu.resourceName": "zq.example/res",
            "clients.gpu.runtimeClassName": "zq-runtime",
            "clients.gpu.image.repository": "zq/gpuimage",
            "clients.gpu.image.tag": "zq-gputag",
            "data.mountPath": "/zq/mountpath",
            "data.volume.existingClaim": "zq-dataclaim",
            "data.volume.subPath": "zq/subpath",
            "metrics.serviceMonitor.interval": "417s",
            "metrics.podMonitor.scrapeTimeout": "413s",
            "dashboards.label": "zq-dlabel",
            "dashboards.labelValue": "zq-dvalue",
            "dashboards.namespace": "zq-dashns",
        },
    ),
    "existing": (
        ("--set", "data.source=volume", "--set", "superlink.persistence.enabled=true"),
        {
            "tls.existingSecret": "zq-tlssecret",
            "superlink.persistence.existingClaim": "zq-stateclaim",
            "data.volume.hostPath": "/zq/hostpath",
        },
    ),
    "site": (
        ("--set", "superlink.enabled=false"),
        {"clients.superlink.address": "zq-link:30800", "clients.superlink.caSecret": "zq-casecret"},
    ),
}
# (what is odd, {value: odd value}, refused by the schema). Without the schema (--skip-schema-validation)
# every odd value must still land verbatim, as a string, where its placeholder did, and add nothing.
ODD_VALUES = [
    (
        "newline injection",  # a key beside the value; the issue's own: readOnly: false on the data mount
        {
            "data.volume.subPath": "x\n  readOnly: false",
            "data.mountPath": "/data\n  readOnly: false",
            "data.volume.existingClaim": "c\n    readOnly: false",
            "data.volume.hostPath": "/srv\n    type: ''",
            "superlink.priorityClassName": "high\n      hostNetwork: true",
            "clients.priorityClassName": "high\n      hostIPC: true",
            "clients.gpu.runtimeClassName": "nvidia\n      hostPID: true",
            "serviceAccount.name": "sa\n      automountServiceAccountToken: true",
            "supernodeAuth.existingSecret": "keys\n            defaultMode: 511",
            "supernodeAuth.existingPublicKeysSecret": "pub\n            defaultMode: 511",
            "supernodeAuth.siteKeysSecret": "site\n            optional: false",
            "tls.existingSecret": "tls\n            defaultMode: 511",
            "clients.superlink.caSecret": "ca\n            defaultMode: 511",
            "clients.superlink.address": "link:30800\n            - --insecure",
            "nameOverride": "x\n    evil: label",
            "fullnameOverride": "x\n  namespace: kube-system",
            "image.repository": "repo\n          command: [sh]",
            "image.tag": "1.0\n#",
            "clients.gpu.image.repository": "repo\nx",
            "clients.gpu.image.tag": "1.0\nx",
            "clients.gpu.resourceName": "nvidia.com/gpu\nx",
            "superlink.podLabels.zqlabel": "v\n    evil: x",
            "superlink.ingress.className": "nginx\n  evil: x",
            "superlink.ingress.host": "fl.example.org\n  evil: x",
            "superlink.persistence.storageClassName": "fast\n  volumeMode: Block",
            "superlink.persistence.existingClaim": "state\n            readOnly: true",
            "tls.clusterDomain": "cluster.local\nevil",
            "tls.certManager.issuerRef.name": "issuer\n    evil: x",
            "tls.certManager.duration": "1h\n  isCA: true",
            "metrics.serviceMonitor.interval": "30s\n      honorLabels: true",
            "metrics.podMonitor.scrapeTimeout": "10s\n      honorLabels: true",
            "dashboards.label": "grafana\n    evil: x",
            "dashboards.labelValue": "1\n    evil: x",
            "dashboards.namespace": "ns\n  evil: x",
        },
        True,
    ),
    (
        "a .. component",
        {"data.volume.subPath": "a/../../b", "data.mountPath": "/data/..", "data.volume.hostPath": "/srv/../../etc"},
        True,
    ),
    (
        "absolute where relative is meant, and the other way round",
        {"data.volume.subPath": "/abs", "data.mountPath": "data", "data.volume.hostPath": "srv"},
        True,
    ),
    (
        "control characters",
        {
            "data.volume.subPath": "a\x1bb",
            "data.mountPath": "/data/a\rb",
            "data.volume.hostPath": "/srv\x08",
            "clients.superlink.caSecret": "ca\t",
            "clients.superlink.address": "link\x0b:30800",
            "superlink.priorityClassName": "a\x07b",
            "image.tag": "1.0\x0b",
            "dashboards.labelValue": "a\tb",
        },
        True,
    ),
    (
        "YAML's own syntax where a name or an image is meant",
        {
            "clients.priorityClassName": "x: y",
            "superlink.priorityClassName": "|",
            "superlink.ingress.className": "nginx #x",
            "superlink.persistence.existingClaim": "*alias",
            "supernodeAuth.siteKeysSecret": "&anchor",
            "tls.existingSecret": "!tls",
            "clients.superlink.caSecret": '"ca"',
            "clients.superlink.address": "{a}:80",
            "serviceAccount.name": "'sa'",
            "clients.gpu.runtimeClassName": "%x",
            "data.volume.existingClaim": "@c",
            "superlink.persistence.storageClassName": "fast, slow",
            "nameOverride": "a: b",
            "fullnameOverride": "[x]",
            "image.repository": "reg/repo name",
            "image.tag": ">x",
            "clients.gpu.image.repository": "{x}",
            "dashboards.label": "a: b",
            "dashboards.namespace": "kube system",
        },
        True,
    ),
    (
        "valid names that YAML would read as a bool, null or number",
        {
            "superlink.priorityClassName": "true",
            "clients.priorityClassName": "null",
            "clients.gpu.runtimeClassName": "123",
            "superlink.ingress.className": "yes",
            "serviceAccount.name": "on",
            "data.volume.existingClaim": "1.5",
            "supernodeAuth.existingSecret": "off",
            "supernodeAuth.existingPublicKeysSecret": "no",
            "supernodeAuth.siteKeysSecret": "y",
            "superlink.persistence.storageClassName": "false",
            "tls.existingSecret": "on",
            "superlink.persistence.existingClaim": "123",
            "clients.superlink.caSecret": "null",
            "clients.superlink.address": "10:30",  # YAML 1.1 reads 630
            "nameOverride": "123",
            "fullnameOverride": "0x1f",
            "image.tag": "1.10",
            "dashboards.label": "123",
            "dashboards.namespace": "false",
        },
        False,
    ),
    (
        "valid paths that hold YAML's own syntax",
        {
            "data.mountPath": "/data/a: b #c {d}",
            "data.volume.subPath": "a: b/#c/{d}/[e]",
            "data.volume.hostPath": "/srv/*x &y !z",
        },
        False,
    ),
]


def values_file(path: Path, settings: dict[str, str]) -> str:
    """A values file setting dotted keys to exact strings (no --set parsing of commas or escapes)."""
    top: dict = {}
    for dotted, value in settings.items():
        node = top
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(top, default_style='"'))  # quoted: Helm's YAML reads `y` as true
    return str(path)


def comparable(docs: list[dict]) -> list[dict]:
    """The documents without what differs from one render to the next or only digests other text:
    generated keys and certificates, checksums, the certificate's names (JSON in an annotation)."""
    out = []
    for doc in copy.deepcopy(docs):
        if doc["kind"] == "Secret":
            doc.pop("data", None)
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        for meta in (doc["metadata"], (spec.get("template") or {}).get("metadata") or {}):
            annotations = meta.get("annotations") or {}
            for key in [k for k in annotations if k.startswith("checksum/") or k == "fedcifar/certificate-names"]:
                del annotations[key]
        out.append(doc)
    return out


def ordered(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=lambda d: (d["kind"], str(d["metadata"]["name"])))


def swapped(node: object, old: str, new: str) -> object:
    if isinstance(node, dict):
        return {swapped(k, old, new): swapped(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [swapped(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def benign_renders(tmp_path_factory) -> dict[str, list[dict]]:
    placeholders = [v for _, values in SHAPES.values() for v in values.values()]
    for a in placeholders:  # a swap touches its own value only
        assert [b for b in placeholders if a in b] == [a], a
    renders = {}
    for shape, (flags, values) in SHAPES.items():
        docs = render(*flags, "-f", values_file(tmp_path_factory.mktemp("benign") / f"{shape}.yaml", values))
        text = json.dumps(docs)
        assert not [v for v in values.values() if v not in text], f"{shape}: placeholders not rendered"
        renders[shape] = comparable(docs)
    return renders


def test_odd_values_cover_every_placeholder() -> None:
    """Every value of SHAPES meets at least one odd value, and every odd value has a placeholder."""
    placed = {key for _, values in SHAPES.values() for key in values}
    odd = {key for _, values, _ in ODD_VALUES for key in values}
    assert odd == placed, (odd - placed, placed - odd)


@pytest.mark.parametrize(
    ("odd", "refused"),
    [(values, refused) for _, values, refused in ODD_VALUES],
    ids=[what for what, _, _ in ODD_VALUES],
)
def test_free_strings_are_refused_or_inert(odd: dict[str, str], refused: bool, benign_renders, tmp_path) -> None:
    """A newline, a `..`, a control character or YAML's own syntax in a value is refused by the schema
    where its field cannot hold it; and the chart quotes every free string it renders, so even without
    the schema the value is one string in its place and the manifests hold nothing else."""
    for shape, (flags, benign) in SHAPES.items():
        mine = {key: value for key, value in odd.items() if key in benign}
        if not mine:
            continue
        odd_values = values_file(tmp_path / f"{shape}.yaml", {**benign, **mine})
        if refused:
            error = render_error(*flags, "-f", odd_values)
            assert "values don't meet the specifications of the schema" in error, error
            missed = [key for key in mine if not re.search(rf"^- {re.escape(key)}: ", error, re.MULTILINE)]
            assert not missed, f"{shape}: the schema accepts {missed}:\n{error}"
            docs = render("--skip-schema-validation", *flags, "-f", odd_values)
        else:
            docs = render(*flags, "-f", odd_values)
        expected = benign_renders[shape]
        for key, value in mine.items():
            expected = swapped(expected, benign[key], value)
        assert ordered(comparable(docs)) == ordered(expected), f"{shape}: {mine}"
