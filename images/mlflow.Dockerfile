# The chart's MLflow tracking server (tracking.mlflow.server): `mlflow server` and what it needs,
# nothing of fedcifar (the ServerApp logs to it with the mlflow-skinny client of the fedcifar image).
# Build from the repo root, offline as images/build does (wheels bind-mounted from images/wheelhouse/):
#
#   images/build mlflow                                   # -> local/fedcifar-mlflow:<mlflow version>
#   docker build -f images/mlflow.Dockerfile -t fedcifar-mlflow .                    # with an index
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG REQUIREMENTS=images/requirements-mlflow.txt
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 HOME=/tmp
COPY ${REQUIREMENTS} /tmp/requirements.txt
RUN --mount=type=bind,source=images/wheelhouse,target=/wheelhouse \
    set -eu; \
    python3 -m venv /opt/venv; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then set -- --no-index --find-links=/wheelhouse; else set --; fi; \
    pip install "$@" -r /tmp/requirements.txt; \
    mlflow --version
USER 10001:10001
EXPOSE 5000
CMD ["mlflow", "server", "--help"]
