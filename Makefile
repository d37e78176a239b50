# HistoHelper developer commands. Every target sets up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
SLIDE ?= $(SHARED)/slides/real/CMU-1-Small-Region.svs
OUT ?= demo-output
# WEIGHTS: a torchvision resnet18 checkpoint (the patch classifier); MIL_WEIGHTS: a slide
# head from `histohelper train-mil` (runs/mil_head.pt). Either left empty stays untrained.
WEIGHTS ?=
MIL_WEIGHTS ?=

.PHONY: venv demo test bench protos config-table lint clean

# The stamp depends on what decides the environment; a second run does nothing.
$(VENV)/.stamp: pyproject.toml constraints.txt
	@echo "make venv: installing the pinned environment into $(VENV): 3 to 5 minutes, 6.6 GiB"
	@echo "  (5.3 GiB of it the CUDA build of torch; README 'Install' has the CPU-only route)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(PY) scripts/demo.py --slide "$(SLIDE)" --out "$(OUT)" $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(if $(MIL_WEIGHTS),--mil-weights "$(MIL_WEIGHTS)")

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/run.py

protos: venv
	$(PY) scripts/gen_protos.py

# README's configuration table, generated from the settings declared in server/config.py.
config-table: venv
	$(PY) -m histohelper.server.config --update README.md

# mypy through scripts/typecheck.py: it checks the installed layout (-p histohelper).
lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(PY) scripts/typecheck.py

clean:
	rm -rf $(VENV) $(OUT) artifacts
