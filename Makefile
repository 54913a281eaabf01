PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The suite mostly waits on servers (NATS, PostgreSQL, HTTP): more workers than cores pay off.
TEST_WORKERS ?= 4
# Python keeps the compiled form of the project's modules (and pytest its rewritten tests) in
# __pycache__: else every process compiles them again — the bus, its gatekeepers, a rebuild's
# lanes, each test worker and command. An environment that turns that off does not reach make's.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test typecheck bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/collabbus up --demo

# Types are part of the suite (tests/test_types.py runs `mypy .`, beside the other tests):
# the application and its tests are to stay mypy clean. `make typecheck` checks them alone.
typecheck: $(STAMP)
	$(BIN)/mypy .

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/collabbus bench

clean:
	rm -rf $(VENV) .collabbus .pytest_cache .mypy_cache
