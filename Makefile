# Two commands do all set-up on a fresh machine: `make demo` (generate a video with the shipped model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# k-diffusion is a test oracle for the samplers, installed with --no-deps: its package pulls torchvision, kornia,
# clip, wandb ... for training code the tests never import (its sampling module needs only the dev extras' torchsde,
# trampoline and scipy).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $(STAMP)

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dfm generate "the digit 7 moves up" --seed 0 --out outputs/demo.mp4

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/samplers.py
