# Thin wrappers over the `tmass` command line. Every variable can be overridden:
#   make extract DATASET=vatex DATA_ROOT=/data/vatex
PYTHON    ?= python3
PIP       ?= $(PYTHON) -m pip
STAMP     := .make/installed

.PHONY: help install test demo demo-encoder clean clean-demo extract train eval ablate bench bench-train bench-extract bench-eval bench-search
.DEFAULT_GOAL := demo

# Every target carries a `## ` description on its rule line; `make help` prints them.
help: ## list the targets, one line each
	@sed -n 's/^\([a-z-]*\):.*## \(.*\)/\1|\2/p' $(MAKEFILE_LIST) | awk -F'|' '{printf "  %-14s %s\n", $$1, $$2}'

# Install the package (editable) with its test extras, pinned to the versions CI uses.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP) ## install tmass (editable) with its test extras, pinned by constraints.txt

test: $(STAMP) ## run the test suite (offline, CPU; a few minutes)
	$(PYTHON) -m pytest -q

# The offline demo: render the demo clips, extract them (--pretrained auto: OpenAI's
# weights for MODEL if they can be loaded, else the demo encoder, a small CLIP trained by
# this project on other rendered clips; labelled everywhere), train meanP, X-Pool and
# T-MASS, evaluate them leak-free, print a comparison table and write plots. Run again,
# it reuses the features and resumes each run in place (a finished run is only checked
# against these settings and re-evaluated); `make clean-demo` starts over.
DEMO_DIR      ?= demo-output
DEMO_DATA     ?= data/demo
# The heads start at the identity and see about 1,300 pairs: at 1e-4 X-Pool was still
# climbing after 10 epochs; at 1e-3 it levels off within 5 (validation R@1).
DEMO_EPOCHS   ?= 5
DEMO_LR       ?= 1e-3
DEMO_HEADS    ?= meanp xpool tmass
# a fifth of the 400 training clips (80 clips, about 320 captions) selects best.pt
DEMO_VAL      ?= 0.2
DEMO_TRAIN_ARGS = --epochs $(DEMO_EPOCHS) --lr $(DEMO_LR) --val-fraction $(DEMO_VAL) --no-final-eval --no-progress
demo: $(STAMP) ## the offline demo: render, extract, train and evaluate meanP, X-Pool, T-MASS into DEMO_DIR
	@set -e; \
	splits=$$(tmass extract --dataset demo --data-root $(DEMO_DATA) --split all --out $(DEMO_DIR)/features \
	  --model $(MODEL) --pretrained auto); \
	features=$$(dirname "$$(echo "$$splits" | tail -n 1)"); \
	for head in $(DEMO_HEADS); do \
	  run=$(DEMO_DIR)/runs/$$head; resume=; \
	  if [ -f $$run/metrics.json ]; then resume=--resume; echo "$$run: finished; up to date if its settings match"; \
	  elif [ -f $$run/last.pt ]; then resume=--resume; echo "$$run: unfinished; resuming it"; fi; \
	  tmass train --features $$features --head $$head $(DEMO_TRAIN_ARGS) --out $$run $$resume; \
	  tmass eval --features $$features --checkpoint $$run/best.pt --json $$run/eval.json \
	    --save-sims $$run/sims.npy --figures $$run/figures; \
	done; \
	tmass report $(addprefix $(DEMO_DIR)/runs/,$(DEMO_HEADS)) --out $(DEMO_DIR) \
	  --gallery-dataset demo --gallery-data-root $(DEMO_DATA)

clean-demo: ## delete DEMO_DIR (features, runs, report), so the next make demo starts over
	rm -rf $(DEMO_DIR)

clean: clean-demo ## clean-demo, the rendered demo clips and bench-report.txt/.json; never runs/ or features-data/
	rm -rf $(DEMO_DATA) $(BENCH_REPORT) $(BENCH_REPORT).tmp $(BENCH_REPORT_JSON) $(BENCH_REPORT).parts

# Retrain the demo encoder's shipped weights on rendered clips that are not the demo's
# (about 10 minutes on a 2-core CPU, one thread) and compare their SHA-256 with the
# recorded one; see extract/demo_encoder.py.
DEMO_ENCODER_OUT ?= extract/demo-encoder/tmass-demo.pt
demo-encoder: $(STAMP) ## retrain the demo encoder (about 10 min) into DEMO_ENCODER_OUT and check its SHA-256
	$(PYTHON) -m tmass.extract.demo_encoder --out $(DEMO_ENCODER_OUT)

# Seconds per training epoch of each of BENCH_HEADS (all: every registered head, plugins
# included, one after another in one process) at batch 32 on the simulated MSR-VTT preset
# (180,000 pairs) against the 180 s target; simulates the features once into
# BENCH_FEATURES, with the word and 2 x 2 patch tokens the token heads need (2.4 GB).
BENCH_FEATURES ?= /tmp/sim-msrvtt-tok
BENCH_STEPS    ?= 500
BENCH_HEADS    ?= all
# Where the benchmarks run (auto: the GPU where there is one), and, set by `make bench`,
# the folder each writes its figures to as JSON.
BENCH_DEVICE   ?= auto
BENCH_JSON_DIR ?=
bench_json = $(if $(BENCH_JSON_DIR),--json $(BENCH_JSON_DIR)/$(1).json)
bench-train: $(STAMP) ## seconds per training epoch of every head on simulated MSR-VTT, against 180 s
	@test -f $(BENCH_FEATURES)/test/manifest.json || \
	  tmass features simulate --preset msrvtt --text-tokens --patch-grid 2 --out $(BENCH_FEATURES)
	$(PYTHON) -m tmass.train.bench --features $(BENCH_FEATURES) --head $(BENCH_HEADS) --batch-size 32 --steps $(BENCH_STEPS) \
	  --device $(BENCH_DEVICE) $(call bench_json,train)

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
extract: $(STAMP) ## videos of DATASET under DATA_ROOT -> features under FEATURES
	tmass extract --dataset $(DATASET) --data-root $(DATA_ROOT) --out $(FEATURES) --model $(MODEL) --pretrained $(PRETRAINED) $(EXTRACT_ARGS)

# Frames/s of the whole extraction against the model alone on the same frames
# (random-init MODEL on CPU, MSR-VTT-sized rendered clips).
bench-extract: $(STAMP) ## extraction frames/s against the model alone on the same frames
	$(PYTHON) -m tmass.extract.bench --model $(MODEL) --device $(BENCH_DEVICE) $(call bench_json,extract)

# Seconds and peak memory of T-MASS inference (M = 20) at the MSR-VTT 1k-A and VATEX test
# scales, fast path beside the naive reference. BENCH_EVAL_ARGS=--quick: MSR-VTT only.
BENCH_EVAL_ARGS ?=
bench-eval: $(STAMP) ## time and peak memory of T-MASS inference, fast path beside naive
	$(PYTHON) -m tmass.evaluate.bench --device $(BENCH_DEVICE) $(BENCH_EVAL_ARGS) $(call bench_json,eval)

# tmass search: two-stage R@10 against exhaustive T-MASS scoring (K = 50, 200, 1000) on
# simulated MSR-VTT, VATEX and a 100k gallery, and latency per query at 10k, 100k and 1M
# videos (the 1M case holds ~5 GiB). BENCH_SEARCH_ARGS="--sizes 10000 --scaled ''": quick.
BENCH_SEARCH_ARGS ?=
bench-search: $(STAMP) ## two-stage search recall against exhaustive scoring, and latency per query
	$(PYTHON) -m tmass.search_bench $(BENCH_SEARCH_ARGS) $(call bench_json,search)

# make extract && make train && make eval chain with these defaults: train reads what
# extract wrote for DATASET, eval takes the latest run (or RUN=...).
# The demo's `auto` features are named after the encoder auto chose: the first found
# (OpenAI's ViT-B-32__auto sorts before the demo encoder's tmass-demo__auto).
FEATURES_DIR ?= $(if $(filter demo,$(DATASET)),$$(ls -d $(FEATURES)/demo/*__auto 2>/dev/null | head -n 1),$(FEATURES)/$(DATASET)/$(MODEL)__$(notdir $(basename $(PRETRAINED))))
RUNS         ?= runs
HEAD         ?= tmass
RUN          ?=
TRIALS       ?= 20
TRAIN_ARGS   ?=
EVAL_ARGS    ?=
# make train never stops at an occupied run directory: an unfinished run there is
# resumed (its settings must match), and a finished one is kept and the new run goes to
# the first free <run>-2, <run>-3, ...
train: $(STAMP) ## train HEAD into RUN (default RUNS/DATASET-HEAD): resumes an unfinished run, never overwrites a finished one
	@set -e; run=$(or $(RUN),$(RUNS)/$(DATASET)-$(HEAD)); resume=; \
	if [ -f $$run/last.pt ] && [ ! -f $$run/metrics.json ]; then \
	  resume=--resume; echo "$$run holds an unfinished run: resuming it (pass RUN=... for a new run)"; \
	elif [ -f $$run/config.json ]; then \
	  n=2; while [ -e $$run-$$n ]; do n=$$((n + 1)); done; \
	  echo "$$run holds a finished run; training into $$run-$$n"; run=$$run-$$n; fi; \
	features=$(FEATURES_DIR); [ -d "$$features" ] || \
	  { echo "no features for DATASET=$(DATASET) under $(FEATURES)/: make extract first, or pass FEATURES_DIR=..."; exit 2; }; \
	tmass train --features $$features --head $(HEAD) --out $$run $$resume $(TRAIN_ARGS)

eval: $(STAMP) ## evaluate the latest training run under RUNS (or RUN=...): table, eval.json, sims.npy, figures/
	@set -e; run="$(RUN)"; [ -n "$$run" ] || run=$$($(PYTHON) -m tmass.train.runs $(RUNS)); \
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
ablate: $(STAMP) ## the paper's ablation sweeps (Tables 4-6, Figs. 6-7) on cached features
	@test -f $(ABLATE_FEATURES)/test/manifest.json || tmass features simulate --preset msrvtt --out $(ABLATE_FEATURES)
	tmass ablate --features $(ABLATE_FEATURES) --out $(ABLATE_OUT) --sweeps $(SWEEPS) --seeds $(SEEDS) \
	  --epochs $(ABLATE_EPOCHS) --lr $(ABLATE_LR) --jobs $(JOBS) $(ABLATE_ARGS)

# Every speed and memory benchmark in one report (BENCH_REPORT), headed by the machine it
# ran on, and every figure as JSON beside it (BENCH_REPORT_JSON: the header, then each
# benchmark's own JSON under its name); progress bars go to the terminal only. Run it on
# an otherwise idle machine; on a GPU machine the GPU runs eval, train and extract.
BENCH_REPORT      ?= bench-report.txt
BENCH_REPORT_JSON ?= $(basename $(BENCH_REPORT)).json
bench: $(STAMP) ## every benchmark in one report, BENCH_REPORT, headed by the machine, and as JSON (BENCH_REPORT_JSON)
	@rm -rf $(BENCH_REPORT).parts && mkdir -p $(BENCH_REPORT).parts
	@{ echo "tmass $$($(PYTHON) -c 'import tmass; print(tmass.__version__)') benchmarks, $$(date -u '+%F %H:%M UTC')"; \
	  echo "machine: $$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1), $$(nproc) cores, $$(free -g | awk '/^Mem/{print $$2}') GiB," \
	       "GPU: $$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep . || echo none)"; \
	  for target in bench-eval bench-train bench-extract bench-search; do \
	    echo; echo "== make $$target"; $(MAKE) --no-print-directory -s $$target BENCH_JSON_DIR=$(BENCH_REPORT).parts || exit 1; \
	  done; } > $(BENCH_REPORT).tmp
	@mv $(BENCH_REPORT).tmp $(BENCH_REPORT) && cat $(BENCH_REPORT) && echo "report written to $(BENCH_REPORT)"
	@$(PYTHON) -c 'import json, pathlib, sys; report, parts, out = map(pathlib.Path, sys.argv[1:]); \
	  title, machine = report.read_text().splitlines()[:2]; \
	  out.write_text(json.dumps({"title": title, "machine": machine.removeprefix("machine: "), "benchmarks": \
	    {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}}, indent=2) + "\n")' \
	  $(BENCH_REPORT) $(BENCH_REPORT).parts $(BENCH_REPORT_JSON)
	@rm -rf $(BENCH_REPORT).parts && echo "figures written to $(BENCH_REPORT_JSON)"
