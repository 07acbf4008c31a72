"""NOTES.txt, as `helm install` prints it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from .support import (
    CHART,
    EXISTING_SECRETS_ARGS,
    FULLNAME,
    HELM,
    INSECURE_ARGS,
    RELEASE,
    SITE_ARGS,
    needs_helm,
)

pytestmark = needs_helm


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it: `helm template` never prints NOTES.txt, so a copy of
    the chart renders it inside an ordinary template."""
    chart = tmp_path / "fedcifar"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        notes_tpl = (CHART / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "notes-render.yaml").write_text(
            '{{- define "notes-render" }}' + notes_tpl + '{{- end }}\nnotes: {{ include "notes-render" . | toJson }}\n'
        )
    result = subprocess.run(
        [
            HELM,
            "template",
            RELEASE,
            str(chart),
            "--namespace",
            "fl",
            "--show-only",
            "templates/notes-render.yaml",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


def test_notes_render(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, "--set", "run.partitioner=dirichlet")
    assert f"kubectl --namespace fl port-forward deploy/{FULLNAME}-superlink 9093:9093" in notes  # the Control API
    assert "flwr run . fedcifar --stream --run-config" in notes and 'partitioner="dirichlet"' in notes
    assert 'address = "127.0.0.1:9093"' in notes
    assert (
        f"get secret {FULLNAME}-superlink-tls -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > \"$FLWR_HOME/ca.crt\""
        in notes
    )
    assert 'root-certificates = "$FLWR_HOME/ca.crt"' in notes and "insecure = true" not in notes
    assert 'cat > "$FLWR_HOME/config.toml" <<TOML' in notes  # unquoted: the shell writes the absolute path
    assert f"port-forward pod/{FULLNAME}-clients-0 9401:9400" in notes
    assert f"logs -f job/{FULLNAME}-run-1" in notes


HISTORY_WARNING = "Helm keeps a copy of them in every revision of this release it records"


def test_notes_say_helm_keeps_generated_keys_in_the_release_history(tmp_path: Path) -> None:
    """Where Helm generates the CA key or the SuperNode private keys, NOTES.txt says that they stay in
    the release history and what to set instead; where the keys come from elsewhere, it says nothing."""
    notes = " ".join(render_notes(tmp_path).split())  # the default: Helm generates both
    assert HISTORY_WARNING in notes, notes
    assert "sh.helm.release.v1.demo.v<revision>" in notes and "helm get manifest" in notes
    assert f"{FULLNAME}-superlink-ca" in notes and f"{FULLNAME}-supernode-keys" in notes
    for remedy in (
        "tls.existingSecret",
        "cert-manager",
        "supernodeAuth.existingSecret",
        "allowHelmGeneratedKeys=false",
    ):
        assert remedy in notes, remedy
    site = " ".join(render_notes(tmp_path, *SITE_ARGS).split())  # a site release: its SuperNode keys only
    assert HISTORY_WARNING in site and f"{FULLNAME}-supernode-keys" in site and "-superlink-ca" not in site
    for args in (EXISTING_SECRETS_ARGS, INSECURE_ARGS):
        assert HISTORY_WARNING not in " ".join(render_notes(tmp_path, *args).split()), args
