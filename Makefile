# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv/ on first use from the pinned requirements (idempotent).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: demo test test-fast test-integration lint format bench clean venv browser

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdray generate --input configs/examples/prompts.csv --output $(DEMO_OUT) --overwrite

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra --durations=15 tests

# The fast tier for everyday work: unit tests, no Ray cluster, no servers.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=10 -m "not integration" tests

# Only the tests that start a Ray cluster or real servers on loopback.
test-integration: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra --durations=15 -m integration tests

# Headless Chromium renders the sweep gallery in the tests (Debian's package; root installs it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "note: could not install chromium; the gallery browser test will be skipped"; \
	  else echo "note: chromium not found; install Debian's 'chromium' to run the gallery browser test"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/sdray bench

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
