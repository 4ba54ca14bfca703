# Two entry points on a fresh clone: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup test demo lint clean

setup: $(STAMP)

# torch first (the 2.13.0 pin takes the local CPU wheel here and the CUDA build on a GPU machine),
# then the project with torch held, then DeepSpeed's CPU shared-memory op built once so no run pays
# the ~60 s g++ compile (see ../shared/STACK.md).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]" torch==2.13.0
	$(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" \
	  || echo "warning: DeepSpeed CPU comm op not pre-built; the first run will build it"
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q tests

# The smoke preset end to end on synthetic street scenes: local Ray, local MLflow (sqlite in runs/).
demo: setup
	RAY_AUTH_MODE=disabled $(PY) experiments/cityscapes.py preset=smoke

lint: setup
	$(VENV)/bin/ruff check vid2vid tests experiments benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
