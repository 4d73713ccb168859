PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m asyncflow demo

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

# The documentation site (mkdocs.yml): warnings fail the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

test: lint docs
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache

# The side-by-side benchmark suite (benchmarks/README.md): builds
# benchmarks/.venv with the pinned peers, takes ~25 minutes on 2 cores.
bench:
	$(PYTHON) benchmarks/run.py

.PHONY: bench-quick
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick
