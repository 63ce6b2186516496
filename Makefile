# `make demo` and `make test` do all set-up: a .venv with the project and its dependencies.
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build onto a CPU machine.
# GPU users: install the CUDA torch of their choice into .venv before `make` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where the CPU torch wheel comes from off this machine, e.g. https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.obliviate-installed

.PHONY: demo test bench-real install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	DS_BUILD_OPS=0 $(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/obliviate demo $(ARGS)

# Not part of `make test`: every method on a real pretrained model, about an hour on 2 cores (README).
bench-real: $(STAMP)
	$(VENV)/bin/obliviate bench-real $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
