# memft — `make demo` runs the quickstart, `make test` runs the tests. Both install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean constraints

$(STAMP): pyproject.toml constraints.txt
	@# a torch already installed for $(PYTHON) (e.g. a CUDA build) is reused through the system site-packages
	test -x $(PY) || { $(PYTHON) -c "import torch" 2>/dev/null && $(PYTHON) -m venv --system-site-packages $(VENV) \
		|| $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	@# no torch at all: the small CPU build (an unpinned `torch` would pull a multi-GB CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# the versions CI tested (constraints.txt), so a fresh machine builds what passed; `make constraints` refreshes it
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memft train recipes/quickstart.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run.py

constraints: $(STAMP)
	@# after an upgrade that passes `make test`: pin what .venv holds (torch excluded: the CPU/CUDA build is the user's)
	{ head -3 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -i "^torch==\|^nvidia-\|^triton==" \
		| sort -f; } > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf runs .pytest_cache
