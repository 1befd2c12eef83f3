# Thin wrappers over the `tmass` command line. Every variable can be overridden:
#   make extract DATASET=vatex DATA_ROOT=/data/vatex
PYTHON    ?= python3
PIP       ?= $(PYTHON) -m pip
STAMP     := .make/installed

.PHONY: install test demo clean-demo extract train eval ablate bench bench-train bench-extract bench-eval
.DEFAULT_GOAL := demo

# Install the package (editable) with its test extras, pinned to the versions CI uses.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

# The offline demo: render the demo clips, extract them with CLIP (pretrained weights if
# they can be loaded, else random init, labelled everywhere), train meanP, X-Pool and
# T-MASS, evaluate them leak-free, print a comparison table and write plots.
DEMO_DIR      ?= demo-output
DEMO_DATA     ?= data/demo
DEMO_FEATURES  = $(DEMO_DIR)/features/demo/$(MODEL)__auto
DEMO_EPOCHS   ?= 10
DEMO_LR       ?= 1e-4
DEMO_HEADS    ?= meanp xpool tmass
# a fifth of the 120 training clips selects best.pt (5 % would be six videos)
DEMO_VAL      ?= 0.2
demo: $(STAMP)
	tmass extract --dataset demo --data-root $(DEMO_DATA) --split all --out $(DEMO_DIR)/features --model $(MODEL) --pretrained auto
	@set -e; for head in $(DEMO_HEADS); do \
	  tmass train --features $(DEMO_FEATURES) --head $$head --epochs $(DEMO_EPOCHS) --lr $(DEMO_LR) \
	    --val-fraction $(DEMO_VAL) --no-final-eval --no-progress --out $(DEMO_DIR)/runs/$$head; \
	  tmass eval --features $(DEMO_FEATURES) --checkpoint $(DEMO_DIR)/runs/$$head/best.pt \
	    --json $(DEMO_DIR)/runs/$$head/eval.json --save-sims $(DEMO_DIR)/runs/$$head/sims.npy \
	    --figures $(DEMO_DIR)/runs/$$head/figures; \
	done
	tmass report $(addprefix $(DEMO_DIR)/runs/,$(DEMO_HEADS)) --out $(DEMO_DIR) \
	  --gallery-dataset demo --gallery-data-root $(DEMO_DATA)

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

# make extract && make train && make eval chain with these defaults: train reads what
# extract wrote for DATASET, eval takes the latest run (or RUN=...).
FEATURES_DIR ?= $(FEATURES)/$(DATASET)/$(MODEL)__$(notdir $(basename $(PRETRAINED)))
RUNS         ?= runs
HEAD         ?= tmass
RUN          ?=
TRIALS       ?= 20
TRAIN_ARGS   ?=
EVAL_ARGS    ?=
train: $(STAMP)
	tmass train --features $(FEATURES_DIR) --head $(HEAD) --out $(or $(RUN),$(RUNS)/$(DATASET)-$(HEAD)) $(TRAIN_ARGS)

eval: $(STAMP)
	@run="$(or $(RUN),$(shell ls -td $(RUNS)/*/ 2>/dev/null | head -1))"; \
	test -n "$$run" || { echo "no run under $(RUNS)/: make train first, or pass RUN=..."; exit 2; }; \
	features=$$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['features'])" $$run/config.json); \
	tmass eval --features $$features --checkpoint $$run/best.pt --trials $(TRIALS) \
	  --json $$run/eval.json --save-sims $$run/sims.npy --figures $$run/figures $(EVAL_ARGS)

# The paper's ablations on cached features (simulated MSR-VTT unless ABLATE_FEATURES is
# given): one markdown + CSV table and one PNG per sweep under ABLATE_OUT. One epoch per
# run keeps a 2-core CPU at about 3 minutes a run; ABLATE_EPOCHS=5 is the paper's setting.
ABLATE_FEATURES ?= $(FEATURES)/sim-msrvtt
ABLATE_OUT      ?= $(RUNS)/ablate
SWEEPS          ?= radius,loss,trials,support,frames
SEEDS           ?= 0,1,2
ABLATE_EPOCHS   ?= 1
ABLATE_LR       ?= 3e-5
JOBS            ?= 2
ABLATE_ARGS     ?=
ablate: $(STAMP)
	@test -f $(ABLATE_FEATURES)/test/manifest.json || tmass features simulate --preset msrvtt --out $(ABLATE_FEATURES)
	tmass ablate --features $(ABLATE_FEATURES) --out $(ABLATE_OUT) --sweeps $(SWEEPS) --seeds $(SEEDS) \
	  --epochs $(ABLATE_EPOCHS) --lr $(ABLATE_LR) --jobs $(JOBS) $(ABLATE_ARGS)

# Every speed and memory benchmark in one report (BENCH_REPORT), headed by the machine it
# ran on; progress bars go to the terminal only. Run it on an otherwise idle machine.
BENCH_REPORT ?= bench-report.txt
bench: $(STAMP)
	@{ echo "tmass $$($(PYTHON) -c 'import tmass; print(tmass.__version__)') benchmarks, $$(date -u '+%F %H:%M UTC')"; \
	  echo "machine: $$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1), $$(nproc) cores, $$(free -g | awk '/^Mem/{print $$2}') GiB," \
	       "GPU: $$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep . || echo none)"; \
	  for target in bench-eval bench-train bench-extract; do \
	    echo; echo "== make $$target"; $(MAKE) --no-print-directory -s $$target || exit 1; \
	  done; } > $(BENCH_REPORT).tmp
	@mv $(BENCH_REPORT).tmp $(BENCH_REPORT) && cat $(BENCH_REPORT) && echo "report written to $(BENCH_REPORT)"
