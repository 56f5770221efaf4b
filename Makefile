# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench clean

$(STAMP): pyproject.toml setup.py workers/nn/_fused.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamtrain demo

lint: $(STAMP)
	$(PY) -m ruff check .

# The public API is annotated; mypy checks workers/ and service/ ([tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(PY) -m mypy

# The Kafka broker's jars come from Maven Central once (deploy/kafka/broker.py fetch), so the
# download is not timed inside a test; Prometheus and promtool come from Debian's package.
test: lint typecheck
	$(PY) deploy/kafka/broker.py fetch
	bash deploy/prometheus/install.sh
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
