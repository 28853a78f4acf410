# The two Quickstart commands, and helpers. The logic lives in deploy/dev.sh.
.PHONY: quickstart test setup lint

quickstart:
	bash deploy/dev.sh quickstart

test:
	bash deploy/dev.sh test

setup:
	bash deploy/dev.sh setup

lint:
	cargo clippy --release --all-targets --features python -- -D warnings
	.venv/bin/ruff check operators flows tests bench
