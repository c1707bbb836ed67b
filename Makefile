# One command each: `make demo` (the main job), `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo bench bench-dp bench-robust bench-participation bench-tau bench-staleness bench-recovery bench-chaos bench-footprint bench-monitor bench-scale bench-message-api test test-slow test-device lint pytest clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,sim,torch,flower,plan,monitor,privacy,dpsgd]"
	# The embedded broker's library without its own pins (its typer pin would break flwr's
	# command line), then its other requirements with theirs: the embedded and flower extras
	# do not go in one venv otherwise.
	$(BIN)/pip install -q --no-deps "amqtt>=0.11.3,<0.12"
	$(BIN)/pip install -q -c constraints.txt "dacite>=1.9.2" passlib==1.7.4 transitions==0.9.2 \
		websockets==15.0.1 "psutil>=7"
	touch $@

demo: $(STAMP)
	$(BIN)/hfl-mqtt demo --out out/demo

bench: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/codec_bench.py --json benchmarks/out/codec.json
	$(BIN)/python benchmarks/aggregator_bench.py --json benchmarks/out/aggregator.json

# Accuracy against epsilon: central DP at the edges, local DP on the workers (about 3 minutes).
bench-dp: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/dp_bench.py --json benchmarks/out/dp.json --plot benchmarks/plots/dp.png

# Poisoned workers: FedAvg edges beside the robust rules (about 2 minutes).
bench-robust: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/robust_bench.py --json benchmarks/out/robust.json

# Who trains each round, on the staleness benchmark's straggler setting (about 9 minutes).
bench-participation: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/participation_bench.py --json benchmarks/out/participation.json

# rounds: auto against fixed rounds under one deadline, 3- and 4-level trees (about 12 minutes).
bench-tau: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/tau_bench.py --json benchmarks/out/tau.json

bench-staleness: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/staleness_bench.py --json benchmarks/out/staleness.json

bench-recovery: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/recovery_bench.py --json benchmarks/out/recovery.json

# What the nodes' metrics records cost the demo, and the dashboard of 1,000 workers keeping up
# (about 3 minutes).
bench-monitor: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/metrics_cost_bench.py --json benchmarks/out/metrics_cost.json
	$(BIN)/python benchmarks/monitor_bench.py --json benchmarks/out/monitor.json

# 1,000 to 10,000 real MQTT workers in one simulation (about 8 minutes).
bench-scale: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/scale_bench.py --json benchmarks/out/scale.json

# Real node processes killed -9, brokers crashed, hostile payloads, a site cut off, 3 seeds
# (about 20 minutes); rewrites its section of RESULTS.md and its plots from the results.
bench-chaos: $(STAMP)
	@mkdir -p benchmarks/out benchmarks/plots
	$(BIN)/python benchmarks/chaos_bench.py --json benchmarks/out/chaos.json \
		--results-md benchmarks/RESULTS.md; status=$$?; \
		cp benchmarks/out/chaos-*.png benchmarks/plots/; exit $$status

# A worker's memory, the agent venv's size, import time and idle CPU (natively); the same in an
# emulated arm64 board with ARCH=arm64 (root, qemu: about 10 minutes).
bench-footprint: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/footprint_bench.py $(if $(ARCH),--arch $(ARCH)) \
		--json benchmarks/out/footprint$(if $(ARCH),-$(ARCH)).json

# A Flower app (Message API) on Flower's deployment engine and on the MQTT tree (about 15 minutes).
bench-message-api: $(STAMP)
	@mkdir -p benchmarks/out
	$(BIN)/python benchmarks/message_api_bench.py --json benchmarks/out/message_api.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint pytest

# The device test (an emulated Raspberry Pi: root, qemu, debootstrap; about 10 minutes, more the
# first time) is slow too, but runs only on its own target.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not device"

test-device: $(STAMP)
	$(BIN)/python -m pytest -m device

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis benchmarks/out out
