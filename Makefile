# Thin wrappers over the `tmass` command line. Every variable can be overridden:
#   make extract DATASET=vatex DATA_ROOT=/data/vatex
PYTHON    ?= python3
PIP       ?= $(PYTHON) -m pip
STAMP     := .make/installed

.PHONY: install test demo clean-demo bench-train extract bench-extract bench-eval
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

# Seconds per training epoch of T-MASS at batch 32 on the simulated MSR-VTT preset
# (180,000 pairs); simulates the features once into BENCH_FEATURES.
BENCH_FEATURES ?= /tmp/sim-msrvtt
BENCH_STEPS    ?= 500
bench-train: $(STAMP)
	@test -f $(BENCH_FEATURES)/test/manifest.json || tmass features simulate --preset msrvtt --out $(BENCH_FEATURES)
	$(PYTHON) -m tmass.train.bench --features $(BENCH_FEATURES) --head tmass --batch-size 32 --steps $(BENCH_STEPS)

# Videos -> frozen CLIP features under FEATURES/<dataset>/<model>__<weights>/<split>/.
# Exits 3 when some inputs were skipped (listed in each manifest's `failed`).
DATASET      ?= demo
DATA_ROOT    ?= data/$(DATASET)
FEATURES     ?= features-data
MODEL        ?= ViT-B-32
# Only the demo may fall back to random weights (labelled in every output); real data
# needs real weights: PRETRAINED=none or a checkpoint path to run offline.
PRETRAINED   ?= $(if $(filter demo,$(DATASET)),auto,openai)
EXTRACT_ARGS ?=
extract: $(STAMP)
	tmass extract --dataset $(DATASET) --data-root $(DATA_ROOT) --out $(FEATURES) --model $(MODEL) --pretrained $(PRETRAINED) $(EXTRACT_ARGS)

# Frames/s of the whole extraction against the model alone on the same frames
# (random-init MODEL on CPU, MSR-VTT-sized rendered clips).
bench-extract: $(STAMP)
	$(PYTHON) -m tmass.extract.bench --model $(MODEL)

# Seconds and peak memory of T-MASS inference (M = 20) at the MSR-VTT 1k-A and VATEX test
# scales, fast path beside the naive reference. BENCH_EVAL_ARGS=--quick: MSR-VTT only.
BENCH_EVAL_ARGS ?=
bench-eval: $(STAMP)
	$(PYTHON) -m tmass.evaluate.bench $(BENCH_EVAL_ARGS)
