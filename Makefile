# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make-installed

.PHONY: install demo test lint bench clean

# torch==2.13.0 first: where a local CPU build is available pip takes it, and the
# project's torch range is then satisfied without pulling CUDA wheels.
$(STAMP): pyproject.toml
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,faiss,hub,sb3,distributed,fast]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) examples/demo.py

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_sampler.py

clean:
	rm -f $(STAMP)
