# Tasks for working on cq. `just --list` shows them.

# Run cq on this machine: a broker on 127.0.0.1:8000 with its UI.
dev:
    cargo run --release -- dev

# Run every test, as CI does.
test:
    scripts/test.sh

# Everything CI checks: formatting, lints, tests.
ci:
    bash .ci/run

fmt:
    cargo fmt --all

lint:
    cargo clippy --workspace --all-targets -- -D warnings

# Accept intended changes to golden files (message JSON, job id vectors, core scripts).
update-golden:
    UPDATE_EXPECT=1 cargo test --workspace

# Build the release binary at target/release/cq.
build:
    cargo build --release
