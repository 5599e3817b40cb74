# memft — `make demo` runs the quickstart, `make test` runs the tests. Both install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@# a torch already installed for $(PYTHON) (e.g. a CUDA build) is reused through the system site-packages
	test -x $(PY) || { $(PYTHON) -c "import torch" 2>/dev/null && $(PYTHON) -m venv --system-site-packages $(VENV) \
		|| $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	@# no torch at all: the small CPU build (an unpinned `torch` would pull a multi-GB CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memft train recipes/quickstart.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run.py

clean:
	rm -rf runs .pytest_cache
