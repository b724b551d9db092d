# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# the project with constraints.txt (torch pinned) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo serve test test-slow lint bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[train,test,ui]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cyclediffusion demo

serve: $(STAMP)
	$(PY) -m cyclediffusion serve --model runs/demo/t2i

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
