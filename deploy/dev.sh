#!/usr/bin/env bash
# Developer and CI entry points. Every step is idempotent and installs what it needs,
# so a fresh clone on a fresh machine works; builds are reused between runs through
# a cargo target directory under the home directory.
#
#   deploy/dev.sh setup        virtualenv, release build of the native core, default model,
#                              container tools where missing (podman, runc, mmdebstrap; as root)
#   deploy/dev.sh quickstart   setup, then the main job on the sample documents, the sink and a search
#   deploy/dev.sh test         setup, Rust tests and the wheel (same profile and target dir), ruff, pytest
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/embedstream/target}"
VENV="${EMBEDSTREAM_VENV:-.venv}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

step() { printf '\n==> %s\n' "$*"; }

setup() {
    command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
    command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }
    if [ ! -x "$PY" ]; then
        step "creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    step "building and installing embedstream (release build of native/)"
    "${PIP[@]}" install -e ".[test,dev]"
    step "container tools where missing (podman, runc, mmdebstrap; root and apt-get only)"
    "$PY" -c "from flows.dev.containers import install_tools; print(install_tools())"
    step "Azure's storage emulator for the tests (Azurite from npm; Node.js with apt where missing)"
    "$PY" -c "from flows.dev.azurite import install; print(install())"
    step "default model"
    "$VENV/bin/embedstream" models pull
}

quickstart() {
    setup
    local es="$VENV/bin/embedstream"
    local in=quickstart.documents out=quickstart.vectors dlq=quickstart.dlq store=lancedb:quickstart.lance
    step "local Kafka (KRaft, jars from Maven Central)"
    "$es" kafka start
    step "fresh topics: $in → $out (dead letters: $dlq)"
    "$es" topics delete "$in" "$out" "$dlq" "$out.sink-dlq" >/dev/null
    rm -rf quickstart.lance
    "$es" topics create "$in" "$out" "$dlq" --partitions 2
    step "publishing the sample documents (flows/samples)"
    "$es" publish flows/samples --topic "$in"
    step "running the flow until the input is drained"
    # A new consumer group each time: the topics are new, and a group keeps the offsets
    # it committed for their names (group mode resumes from committed offsets).
    "$es" run --input-topic "$in" --output-topic "$out" --dlq-topic "$dlq" --until-end \
        --group-id "quickstart-$(date +%s)" --metrics-port 0
    step "vector records on $out"
    "$es" tail --topic "$out" -n 50 --timeout 3
    step "dead letters on $dlq"
    "$es" tail --topic "$dlq" -n 50 --timeout 3
    step "the sink: $out into the embedded LanceDB store $store"
    "$es" sink --output-topic "$out" --store "$store" --group-id quickstart.sink --from beginning --until-end --metrics-port 0
    step "search: \"how are long documents split?\""
    "$es" search "how are long documents split?" --store "$store" --k 3
    step "search: \"what happens to files that cannot be read?\""
    # Dense: the README shows these cosine scores (the default, hybrid, fuses ranks).
    "$es" search "what happens to files that cannot be read?" --store "$store" --k 3 --mode dense
    echo
    echo "The broker keeps running: '$es kafka stop' stops it."
}

test_all() {
    setup
    step "Rust tests"
    cargo test --release --manifest-path native/Cargo.toml --quiet
    step "wheel (same profile, features and target dir; tests install it in a fresh virtualenv)"
    local wheels="$CARGO_TARGET_DIR/embedstream-wheel"
    rm -rf "$wheels"
    "$VENV/bin/maturin" build --release --quiet --out "$wheels"
    EMBEDSTREAM_WHEEL="$(ls "$wheels"/embedstream-*.whl)"
    export EMBEDSTREAM_WHEEL
    step "ruff"
    "$VENV/bin/ruff" check operators flows tests bench
    step "pytest"
    "$PY" -m pytest -q "$@"
}

case "${1:-}" in
    setup) setup ;;
    quickstart) quickstart ;;
    test) shift; test_all "$@" ;;
    *) echo "usage: $0 setup|quickstart|test [pytest args]" >&2; exit 2 ;;
esac
