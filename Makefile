# zps: set-up and tests.  `make test` works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: test install clean demo bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The main job: digits on 2 servers and 4 workers at staleness 2.
demo: $(VENV)/.installed
	$(PY) bin/ps-launch --workload digits --servers 2 --workers 4 --staleness 2 \
		--out out/demo --save out/demo/model.pt

bench: $(VENV)/.installed
	$(PY) bin/ps-bench --json out/bench.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
