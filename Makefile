# Finds Python 3.12 portably: a python3.12 on PATH, else pyenv's 3.12.x.
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1 && echo python3.12 || \
	(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch's CUDA wheels are ~3 GB and the venv ~6 GB; pip's wheel cache would add another 3 GB on disk.
PIP_FLAGS ?= --no-cache-dir

.PHONY: demo test install clean

demo: $(STAMP)
	$(BIN)/dgc-pyro fit --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.12 not found (install python3.12 or pyenv's 3.12)"; exit 2; }
	@avail=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$avail" -ge 9 ] || \
		echo "warning: $$avail GiB free on this disk; torch with its CUDA libraries needs about 9 GiB to install" >&2
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
