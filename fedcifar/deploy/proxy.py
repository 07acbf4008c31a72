"""The chart's nginx proxy (the SuperLink's public face) outside Kubernetes: ``helm template`` renders
its ConfigMap, and the pod's paths are mapped to a folder of this machine, for the tests and the scale
benchmark to run Debian's nginx in front of a real ``fedcifar superlink``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "fedcifar"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
HELM = shutil.which("helm") or (
    "/var/cache/local-k8s/bin/helm" if Path("/var/cache/local-k8s/bin/helm").exists() else None
)


def proxy_config(public: int, control: int, tls_dir: Path, tmp: Path, outputs: int, *values: str) -> str:
    """The chart's nginx.conf (with ``values``, ``--set`` pairs), its pod paths mapped to ``tmp`` and
    the SuperLink's certificate to ``tls_dir``."""
    if HELM is None:
        raise FileNotFoundError("helm is not installed: it renders the proxy's config from the chart")
    ports = (f"superlink.port={public}", f"superlink.controlPort={control}", f"superlink.outputsPort={outputs}")
    sets = [arg for pair in (*ports, *values) for arg in ("--set", pair)]
    chart = [HELM, "template", "t", str(CHART), "--show-only", "templates/superlink-proxy-configmap.yaml"]
    done = subprocess.run([*chart, *sets], capture_output=True, text=True, timeout=60, check=True)
    conf = yaml.safe_load(done.stdout)["data"]["nginx.conf"]
    conf = conf.replace("/tmp/", f"{tmp}/").replace("/etc/fedcifar/tls/", f"{tls_dir}/")
    conf = conf.replace("access_log /dev/stdout", f"access_log {tmp}/access.log")
    conf = conf.replace("root /var/lib/fedcifar;", f"root {tmp}/state;")  # the state volume
    if os.geteuid() == 0:  # nginx's workers would drop to `nobody`, which cannot read these folders
        conf = "user root;\n" + conf
    return conf
