# Sourced by run.sh and niid.sh on the GPU machine: a venv at $VENV whose own site-packages (the
# wheels carried in .gpu/wheels) come before the image's (torch, numpy, ...), with this checkout on
# its path as an editable install would put it (the benches run the apps in this folder), put first
# on PATH so that fedcifar finds flwr and flower-* beside its interpreter. Made once per machine:
# a later call on the same warm machine (which carries no wheels) reuses it.
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/fedcifar-venv}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
if [ ! -x "$VENV/bin/flower-superlink" ]; then
    "$PYTHON" -m venv --without-pip "$VENV"
    {
        echo "$PWD"
        "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))'
    } >"$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/gpu-image.pth"
    # --ignore-installed: the carried version even where the image holds another (or the same)
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --ignore-installed .gpu/wheels/*.whl
fi
export PATH="$VENV/bin:$PATH"
