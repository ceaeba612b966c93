# LineWatch: `make run` serves the embedded default, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8000
HOST ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: run test model bench install install-dev lint clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# runtime only (no torch)
$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

# runtime + OpenVINO + tests + training workspace (torch CPU build, pinned)
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test,train,openvino]'
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: $(VENV)/.runtime
	@echo "LineWatch: dashboard API http://$(HOST):$(PORT)/docs  metrics http://$(HOST):$(PORT)/metrics  websocket ws://$(HOST):$(PORT)/api/v1/ws/frames"
	$(VENV)/bin/linewatch serve --host $(HOST) --port $(PORT)

# test-only tools that must not share .venv: Ultralytics (its own torch) in
# .venv-ultralytics; rtmlib without its dependencies (they would replace ours)
$(VENV)/.test-extras: $(VENV)/.dev scripts/ultralytics-env
	scripts/ultralytics-env
	$(PIP) install -q --no-deps rtmlib
	touch $@

test: $(VENV)/.test-extras
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check service models tests
	$(VENV)/bin/mypy

# Reproduce the shipped default model from scratch (CPU, see models/zoo/*.md).
MODEL := models/zoo/linewatch-parts-s.onnx
EVAL_CMD := $(VENV)/bin/linewatch model eval --model $(MODEL) --scenario conveyor --seed 9000 --frames 200 --every 5 --threads 1 --json
model: $(VENV)/.dev
	$(PY) -m models.train --recipe default --out runs/default
	$(PY) -m models.export runs/default/best.pt --out $(MODEL)
	$(EVAL_CMD) > runs/default/eval.json
	$(PY) -m models.card $(MODEL) --checkpoint runs/default/best.pt --log runs/default/log.jsonl \
		--eval runs/default/eval.json --eval-command "$(EVAL_CMD)"

bench: $(VENV)/.runtime
	$(VENV)/bin/linewatch bench --seconds 20 --json

clean:
	rm -rf $(VENV) .venv-ultralytics .pytest_cache .mypy_cache .ruff_cache
