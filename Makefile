# Every target runs inside .venv at the repo root; `make install` creates it.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo eval bench lint

install: $(STAMP)

# Re-installs only when a requirements file or pyproject.toml changed, so a second `make install` takes seconds.
$(STAMP): requirements.txt requirements-dev.txt requirements-export.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-export.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The whole suite, then its 25 slowest tests; `make test-fast` leaves out the ones that start processes (marked
# slow by tests/conftest.py) for a quick loop while editing.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ruff (rules and format in pyproject.toml) over the library, entry points, scripts and tests; shellcheck the launchers.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck scripts/train_multigpu.sh scripts/slurm/train.sbatch scripts/gpu_check.sh

DATA ?=
BACKEND ?= torchvision
MODELS ?=
BENCH_ARGS ?=

demo: $(STAMP)
	$(PY) scripts/demo.py

# The fine-tuning workflow on the digits: 0-4, then fine-tuned on 5-9 beside 5-9 from scratch, then prediction.
.PHONY: demo-finetune
demo-finetune: $(STAMP)
	$(PY) scripts/demo.py --finetune

eval: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make eval DATA=<imagenet root with val/ (and train/ for the int8 calibration)> [BACKEND=torchvision|dali] [MODELS=\"res2net50_26w_4s ...\"] [INT8=0]"; exit 2; }
	$(PY) scripts/eval_released.py --data "$(DATA)" --backend $(BACKEND) $(if $(MODELS),--models $(MODELS)) $(if $(filter 0,$(INT8)),,--int8)

.PHONY: eval-suite
CHECKPOINT ?=
ROOTS ?=
SUITE_ARGS ?=

eval-suite: $(STAMP)
	@test -n "$(CHECKPOINT)" -a -n "$(ROOTS)" || { echo "usage: make eval-suite CHECKPOINT=<model name or .pth>" \
		"ROOTS=<folder holding the sets> [SUITE_ARGS=...] (scripts/eval_suite.py --help)"; exit 2; }
	$(PY) scripts/eval_suite.py --checkpoint "$(CHECKPOINT)" --roots "$(ROOTS)" $(SUITE_ARGS)

bench: $(STAMP)
	MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 $(PY) scripts/benchmark.py $(BENCH_ARGS)
