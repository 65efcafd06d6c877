# The README's commands, each self-contained on a fresh clone (Python 3.10+, a CPU is enough):
#   make demo    set up, train the quick-start model (configs/cpu.yaml) and sample sevens
#   make test    set up, then run the style checks and the whole test suite (what CI runs)
#   make serve   set up, then serve the live prompt page on http://127.0.0.1:8000
#   make gpu-check  on a lent GPU machine: CUDA tests, the seed's recipe, the benchmark (bench/gpu_check.py);
#                   PY=python3 uses a Python that already has a CUDA build of torch
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup demo test serve gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) train.py --config configs/cpu.yaml --resume auto
	$(PY) sample.py --prompt "7" --output_dir outputs/cpu --overwrite

test: setup
	tests/system_packages.sh
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

serve: setup
	$(PY) serve.py

gpu-check: setup
	$(PY) -m bench.gpu_check
