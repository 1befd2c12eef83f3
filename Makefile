# Thin wrappers over the `tmass` command line. Every variable can be overridden:
#   make extract DATASET=vatex DATA_ROOT=/data/vatex
PYTHON    ?= python3
PIP       ?= $(PYTHON) -m pip
STAMP     := .make/installed

.PHONY: install test demo clean-demo
.DEFAULT_GOAL := demo

# Install the package (editable) with its test extras, pinned to the versions CI uses.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

DEMO_DIR ?= demo-output
demo: $(STAMP)
	tmass features simulate --preset tiny --out $(DEMO_DIR)/features/sim-tiny --seed 0
	tmass features check $(DEMO_DIR)/features/sim-tiny
	tmass features info $(DEMO_DIR)/features/sim-tiny

clean-demo:
	rm -rf $(DEMO_DIR)
