# The two entry points: `make run` (the main job) and `make test` (tests + lint).
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATASET := /usr/share/datasets/fashion-mnist

.PHONY: run test dataset

run: $(STAMP) dataset
	$(VENV)/bin/sparsefx demo

test: $(STAMP) dataset
	$(PYTHON) -m pytest -q
	$(VENV)/bin/ruff check .

$(PYTHON):
	python3 -m venv $(VENV)

# Reinstall only when the dependency list changes, so repeated runs stay quick.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

# The dataset is optional: without root or apt the demo still runs, so failure only warns.
dataset:
	@if [ -d $(DATASET) ]; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "note: $(DATASET) missing; run 'sudo apt-get install dataset-fashion-mnist' to add it"; \
	else \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
		|| echo "note: could not install dataset-fashion-mnist with apt-get; continuing without it"; \
	fi
