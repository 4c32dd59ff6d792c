# Two commands on a fresh machine: `make train` and `make test`.
# The first run builds .venv (a few minutes); later runs reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# GPU profile when an NVIDIA driver answers, CPU profile otherwise (override: make PROFILE=cpu ...)
PROFILE ?= $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(PROFILE)

.PHONY: install train test test-slow bench ui ui-check serve clean gpu-plan gpu-prepare gpu-rehearse

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(PROFILE),text,dev,ray]"
	$(PIP) install -q -c constraints.txt --no-deps torchrec==1.8.0
	$(PY) -c "import torch, torchrec, polars, lightning, mlflow, faiss; print('installed: torch', torch.__version__, '| torchrec', torchrec.__version__, '| profile $(PROFILE)')"
	touch $(STAMP)

train: install
	$(PY) -m recsys.train $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

# The MLflow UI of the runs (STORE=... another store; the training prints the address of its run).
STORE ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
ui: install
	@echo "the training runs: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --backend-store-uri $(STORE) --host 127.0.0.1 --port 5000

# What a person sees in the MLflow UI, checked in headless Chromium (apt-get install chromium)
ui-check: install
	$(PY) bench/ui.py $(ARGS)

# The REST endpoint of one size on 127.0.0.1 (docs/serving.md): MODEL=exports/d64 or MODEL=models:/NAME@alias
PORT ?= 8000
serve: install
	@test -n "$(MODEL)" || { echo "error: give MODEL=DIR (an export, e.g. exports/d64) or MODEL=models:/NAME@alias" >&2; exit 2; }
	$(PY) -m serving.rest --model "$(MODEL)" --port $(PORT) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Real datasets from ../shared/datasets, prepared into data/ (see configs/ml-1m.yaml, configs/lastfm.yaml, configs/sports.yaml)
SHARED ?= ../shared/datasets
data/ml-1m: install
	$(PY) -m recsys.data prepare --interactions $(SHARED)/ml-1m/interactions.parquet \
	    --items $(SHARED)/ml-1m/items.csv --out $@ --user-col user_id --item-col item_id --time-col seq \
	    --text-cols title genres --category-cols genres --min-count 5 --cold-items false

data/sports: install
	$(PY) -m recsys.data prepare --interactions $(SHARED)/sports/interactions.csv \
	    --items $(SHARED)/sports/items.csv --out $@ --user-col user_id --item-col item_id --time-col seq \
	    --category-cols attributes --min-count 5

data/lastfm: install
	$(PY) -m recsys.data prepare --interactions $(SHARED)/lastfm/interactions.tsv \
	    --items $(SHARED)/lastfm/items.tsv --out $@ --user-col user_id --item-col item_id --time-col timestamp \
	    --text-cols name --min-count 5 --repeats keep

# The GPU plan of issue 16 (docs/gpu.md): its dry run and the calls a session lent a device makes;
# the download of its files; a rehearsal of the device script here on CPU (after gpu-prepare).
gpu-plan: install
	PYTHONPATH=. $(PY) -m pytest -q -o addopts= -m "not slow" -p no:cacheprovider tests/test_gpu_plan.py
	$(PY) bench/gpu/prepare.py --print

gpu-prepare: install
	$(PY) bench/gpu/prepare.py

gpu-rehearse: install
	$(PY) bench/gpu/run_on_device.py run --rehearse
