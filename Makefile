# The two commands of the README: `make demo` (whole stack, demo key printed) and `make test`.
VENV := .venv/bin
POLICY := extproc/examples/policy

.PHONY: setup demo test lint protos envoy-example deploy-config bench soak soak-quick export-soak load mutants clean

setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/tollgate demo

test: setup lint
	$(VENV)/pytest -q

lint: setup
	$(VENV)/ruff check extproc tests
	$(VENV)/mypy extproc tests

protos: setup
	$(VENV)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. protos/extproc/pb/ext_proc.proto protos/extproc/pb/als.proto

envoy-example: setup
	$(VENV)/tollgate envoy-config --policy $(POLICY) > envoy/envoy.yaml

deploy-config: setup
	$(VENV)/python -m scripts.render_deploy

bench: setup
	@TOLLGATE_APT_EXTRA=wrk scripts/setup.sh
	@TOLLGATE_APT_EXTRA="nodejs npm" scripts/setup.sh || echo "bench: nodejs/npm not installed; Portkey is skipped"  # Portkey's gateway
	$(VENV)/python -m bench.run

# Memory soak (issue 14): N requests of mixed traffic, RSS and Redis sampled every 10 s.
N ?= 500000
soak: setup
	$(VENV)/python -m bench.soak --requests $(N)

soak-quick: setup
	$(VENV)/python -m bench.soak --requests 50000

# Export soak (issue 13): stream length and export lag with `usage export` running.
export-soak: setup
	@TOLLGATE_APT_EXTRA=wrk scripts/setup.sh
	$(VENV)/python -m bench.export_soak

load: setup  # 2,000 concurrent slow streams through one Envoy and one processor (issue 10)
	TOLLGATE_LOAD_STREAMS=2000 TOLLGATE_LOAD_GAP_S=15 TOLLGATE_LOAD_RAMP_S=12 $(VENV)/pytest -q -s tests/test_load.py

# Mutation run (issue 9): one-token mutants of the money and fallback core, each against the
# tests that can kill it; prints every mutant, who killed it, and the kill rate (fails below 90%).
mutants: setup
	$(VENV)/python -m scripts.mutants --json bench/mutants.json

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
