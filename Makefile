# One entry point for people and CI. The environment lives in .venv and is reused when complete.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.flatq-installed
PY := $(VENV)/bin/python
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist where apt is available;
# elsewhere point FLATQ_DATA at a folder holding the four idx .gz files.
data:
	@if [ -n "$$FLATQ_DATA" ]; then echo "using Fashion-MNIST from FLATQ_DATA=$$FLATQ_DATA"; \
	elif [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then echo "using Fashion-MNIST from $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found: install dataset-fashion-mnist or set FLATQ_DATA" >&2; exit 1; fi

demo: setup data
	$(VENV)/bin/flatq demo --overwrite

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs build src/*.egg-info
