# `make demo` and `make test` each create .venv and install the project when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

install: $(STAMP)

# the `deployfit-run` flow on the embedded defaults: the digits demo CNN, the digits data, this machine's
# profile (calibrated quickly when missing), a latency and a size requirement, the top 3 executed and measured
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/deployfit run demo:digits-cnn --data digits --hardware host \
		--max-latency-ms 1.0 --max-size-mb 0.05 --top-k 3

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/estimate.py

clean:
	rm -rf build .pytest_cache
