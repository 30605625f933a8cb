# tiny-rlhf: `make run` executes the notebooks in order, `make test` runs the test suite,
# `make bench` compares with TRL on this machine (its own environments, bench/.venv and bench/.venv116).
# Both create .venv when it is missing and install requirements.txt into it (the newest releases in
# its ranges; CONSTRAINTS=constraints/latest.txt rebuilds the last tested set exactly).
# `make test-colab` runs the same tests in .venv-colab, Google Colab's published package set.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONSTRAINTS ?=
# 4_test runs last: it reports every model the others made (SFT, PPO, DPO, GRPO)
NOTEBOOKS := 0_download 1_actor 2_critic 3_rlhf 5_dpo 6_grpo 4_test

.PHONY: install run test test-colab colab-env freeze seeds clean-model bench bench-install bench-env-116

$(VENV)/.installed: requirements.txt
	@echo ">>> creating $(VENV) and installing requirements (first time: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -r requirements.txt \
	  $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@touch $@

install: $(VENV)/.installed

# executes each notebook in place with papermill, so the outputs you see are the ones of this run
run: install
	@for nb in $(NOTEBOOKS); do \
	  [ -f $$nb.ipynb ] || continue; \
	  echo ">>> $$nb.ipynb"; \
	  RLHF_TEXT_PROGRESS=1 $(PY) -m papermill --log-output --no-progress-bar -k python3 $$nb.ipynb $$nb.ipynb || exit 1; \
	done

# unit tests, then every notebook in the smoke preset (outputs go to a temp dir, never to model/)
test: install
	@out=$$(mktemp -d); \
	RLHF_PRESET=smoke RLHF_OUT=$$out TQDM_DISABLE=1 $(PY) -m pytest -q -p no:cacheprovider \
	  tests $(wildcard [0-9]_*.ipynb) --nbval-lax --nbval-current-env; \
	rc=$$?; rm -rf $$out; exit $$rc

# constraints/latest.txt: the exact versions of .venv (after a `make test` on the newest releases)
freeze: install
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > constraints/latest.txt

# ---------------------------------------------------------------------------- Colab's package set
# .venv-colab holds Colab's published versions (constraints/colab-<date>.txt, made from Colab's
# pip-freeze by .dev/colab_constraints.py) of what the notebooks import, with Colab's Jupyter; the
# local CPU torch stands in for Colab's CUDA build and this machine's Python for Colab's 3.13.
# test-colab: the unit tests and the smoke notebooks there (test_colab.py runs each notebook's first
# cell under a stubbed google.colab and checks that it installs nothing).
COLAB_CONSTRAINTS ?= constraints/colab-2026-08.txt
COLAB_VENV := .venv-colab
COLAB_PY   := $(COLAB_VENV)/bin/python
COLAB_PKGS := transformers tokenizers datasets accelerate safetensors peft pandas numpy pyarrow \
  matplotlib tqdm huggingface_hub packaging ipykernel ipython nbclient nbformat jupyter_client pytest nbval

$(COLAB_VENV)/.installed: $(COLAB_CONSTRAINTS) requirements.txt
	@echo ">>> creating $(COLAB_VENV): Colab's packages from $(COLAB_CONSTRAINTS), this machine's torch"
	@test -x $(COLAB_PY) || $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install --disable-pip-version-check -q -c $(COLAB_CONSTRAINTS) \
	  "$$(grep '^torch' requirements.txt)" $(COLAB_PKGS)
	@touch $@

colab-env: $(COLAB_VENV)/.installed

test-colab: colab-env
	@out=$$(mktemp -d); \
	RLHF_PRESET=smoke RLHF_OUT=$$out TQDM_DISABLE=1 $(COLAB_PY) -m pytest -q -p no:cacheprovider \
	  -m "not slow" tests $(wildcard [0-9]_*.ipynb) --nbval-lax --nbval-current-env; \
	rc=$$?; rm -rf $$out; exit $$rc

# the whole pipeline for seeds 0 1 2 (about 3 x make run) into model/seeds/<seed>/: docs/seeds.json,
# docs/seeds.md and the README table of mean, spread and worst per model (SEEDS="3 4" for others;
# SET="rm_ensemble=3" changes Config fields; then also JSON=docs/other.json, or the README table moves)
seeds: install
	$(PY) seeds.py $(if $(SEEDS),--seeds $(SEEDS)) $(if $(SET),--set $(SET)) \
	  $(if $(JSON),--json $(JSON) --no-readme)

clean-model:
	rm -rf model/*/ model/report.json

# ---------------------------------------------------------------------------- benchmark against TRL
# Separate environments: TRL is a benchmark dependency only. `make bench` trains the shared starting points once
# (cached in bench/out/start), then runs ours and TRL interleaved, 3 rounds, each run in a fresh process, and
# writes bench/results.{json,md,png} and the README table. BENCH_QUICK=1 runs a smoke version (about 2 minutes).
BENCH_VENV := bench/.venv
BENCH_PY   := $(BENCH_VENV)/bin/python
# trl 1.16 for the DPO / GRPO pairs: it has no PPOTrainer any more, so it gets its own environment
BENCH116_VENV := bench/.venv116
BENCH116_PY   := $(BENCH116_VENV)/bin/python

$(BENCH_VENV)/.installed: bench/requirements.txt
	@echo ">>> creating $(BENCH_VENV) (torch CPU build, trl 1.12, transformers) for the benchmark"
	@test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --disable-pip-version-check --progress-bar off -r bench/requirements.txt
	@touch $@

$(BENCH116_VENV)/.installed: bench/requirements-trl116.txt
	@echo ">>> creating $(BENCH116_VENV) (torch CPU build, trl 1.16) for the DPO and GRPO pairs"
	@test -x $(BENCH116_PY) || $(PYTHON) -m venv $(BENCH116_VENV)
	$(BENCH116_PY) -m pip install --disable-pip-version-check --progress-bar off -r bench/requirements-trl116.txt
	@touch $@

bench-install: $(BENCH_VENV)/.installed

bench-env-116: $(BENCH116_VENV)/.installed

bench: bench-install bench-env-116
	$(BENCH_PY) bench/bench.py $(if $(BENCH_QUICK),--quick)
