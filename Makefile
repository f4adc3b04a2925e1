# The two commands: `make run` (the whole system) and `make test` (everything CI checks).
# Both create the virtual environment themselves; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml deploy/scripts/system-packages.txt | sha1sum | cut -c1-12)

.PHONY: run test lint bench chaos soak clean

$(STAMP): pyproject.toml deploy/scripts/system-packages.txt
	bash deploy/scripts/install-system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

run: $(STAMP)
	$(BIN)/hpcfleet up

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP) lint
	bash deploy/scripts/ensure-services.sh
	$(BIN)/pytest

bench: $(STAMP)
	bash deploy/scripts/ensure-services.sh
	@for script in tests/benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

chaos: $(STAMP)
	$(BIN)/python tests/chaos/chaos.py --seed $(or $(SEED),7) --minutes 10

soak: $(STAMP)
	$(BIN)/python tests/chaos/chaos.py --soak --seed $(or $(SEED),7) --minutes 60

clean:
	rm -rf $(VENV) .hpcfleet .pytest_cache .mypy_cache .ruff_cache
