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

demo: $(STAMP)
	$(VENV)/bin/deployfit analyze demo:digits-resnet
	$(VENV)/bin/deployfit estimate demo:digits-resnet --strategy prune:0.5:global,quantize:int8
	$(VENV)/bin/deployfit apply demo:digits-resnet --strategy prune:0.5:global,quantize:int8 --out build/demo --data digits

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/estimate.py

clean:
	rm -rf build .pytest_cache
