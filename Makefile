# Two commands do all the set-up on a fresh machine:
#   make chat   -> creates .venv, installs jneox, starts `jneox chat`
#   make test   -> creates .venv, installs jneox with test extras, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# the CPU wheel; install torch before anything else so no resolver pulls a multi-GB CUDA build
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: chat test install docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

chat: $(VENV)/.installed
	$(VENV)/bin/jneox chat $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# docs/ as a site in build/site/ (mkdocs comes with the test extras); tests/test_docs.py builds it too
docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict --site-dir build/site
