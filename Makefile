# Two entry points: `make demo` (main job) and `make test` (the test suite). Each creates .venv
# with the exact versions in constraints.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint parity clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/punkdiff demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

parity: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m parity

clean:
	rm -rf $(VENV) build *.egg-info
