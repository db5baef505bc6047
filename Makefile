# Developer shortcuts; the README's two commands (./dev.sh up, ./dev.sh test) need nothing but bash.
PY := .venv/bin/python

.PHONY: install lint check test run bench bench-serving soak
install:
	./dev.sh setup
lint:
	$(PY) -m ruff format app models workers bench tests deploy
	$(PY) -m ruff check --fix app models workers bench tests deploy
check:
	$(PY) -m ruff format --check app models workers bench tests deploy
	$(PY) -m ruff check app models workers bench tests deploy
	$(PY) -m mypy app workers models
test:
	./dev.sh test
run:
	./dev.sh up
bench:  # the tail-latency sweep: docs/results/tail.{json,md} and plots (about 11 minutes)
	$(PY) -m app.cli bench tail --json docs/results/tail.json
bench-serving:  # overhead, throughput, deadline: docs/results/serving.json (about 4 minutes)
	$(PY) -m app.cli bench serving --json docs/results/serving.json
soak:  # ten minutes with stragglers and kills: docs/results/soak.{json,md}
	$(PY) -m app.cli bench soak
