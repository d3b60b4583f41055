# Two commands on a fresh machine: `make demo` and `make test`. Both create the environment first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIXART := $(VENV)/bin/pixart
# On this project's machines torch==2.13.0 is a CPU build on local disk; elsewhere pick your own build.
TORCH  ?= torch==2.13.0

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $@

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -p no:warnings --durations=12

# A tiny random-weight model (its images are noise), then the real staged flow as three processes.
demo: install
	rm -rf demo && mkdir demo
	$(PY) -m pixart_cli.random_model demo/tiny-model > /dev/null
	cd demo && export PIXART_MODEL=tiny-model && \
	  ../$(PIXART) encode "a cute cat" -o embeddings.pt > /dev/null && \
	  ../$(PIXART) denoise embeddings.pt --seed 0 -o latents.pt > /dev/null && \
	  ../$(PIXART) decode latents.pt -o cat.png | sed 's|^|demo/|'

clean:
	rm -rf demo .pytest_cache
