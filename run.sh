#!/usr/bin/env bash
# core_jax: one entry point that sets up its own environment.
#   ./run.sh demo     run the main job (launch/evaluate.py) on the built-in demo
#   ./run.sh test     run the test suite (ruff, then pytest); extra args go to pytest
#   ./run.sh setup    only create/refresh the virtual environment
#   ./run.sh py ...   run python inside the environment
set -euo pipefail
cd "$(dirname "$0")"

VENV="${CORE_JAX_VENV:-.venv}"
LOCK="requirements.lock"
STAMP="$VENV/.lock-sha256"

setup() {
  local want
  want="$(sha256sum "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return
  fi
  echo "[run.sh] setting up $VENV from $LOCK (first run takes several minutes)" >&2
  if [[ ! -x "$VENV/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$LOCK"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$STAMP"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup)
    setup
    ;;
  demo)
    setup
    exec "$VENV/bin/python" -m launch.evaluate --config=configs/demo.py "$@"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  py)
    setup
    exec "$VENV/bin/python" "$@"
    ;;
  *)
    echo "usage: ./run.sh {demo|test|setup|py} [args...]" >&2
    exit 2
    ;;
esac
