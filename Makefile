# Developer shortcuts; the README's two commands (./dev.sh up, ./dev.sh test) need nothing but bash.
PY := .venv/bin/python

.PHONY: install lint check test run
install:
	./dev.sh setup
lint:
	$(PY) -m ruff format app models workers bench tests
	$(PY) -m ruff check --fix app models workers bench tests
check:
	$(PY) -m ruff format --check app models workers bench tests
	$(PY) -m ruff check app models workers bench tests
	$(PY) -m mypy app workers models
test:
	./dev.sh test
run:
	./dev.sh up
