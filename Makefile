# ovs-underlay — build, test, demo. `make test` and `make demo` work on a fresh Debian 12 as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_OUT := core/_proto/ipam_pb2.py
ETCD_PROTO_OUT := core/_proto/etcd/rpc_pb2.py
DIST := dist/ovs-underlay
PREFIX ?= /opt/ovs-underlay
CNI_BIN_DIR ?= /opt/cni/bin
DESTDIR ?=
PYTEST_ARGS ?=
# One progress line per set-up step; the full output goes to build/logs/setup.log and is shown
# when a step fails. `make V=1 ...` shows everything as it happens.
STEP := scripts/step.sh

.PHONY: setup sysdeps venv proto lint test unit integration binary image cnitool install demo demo-cluster bench bench-quick soak soak-cluster bench-agent clean

setup: sysdeps venv proto

sysdeps:
	@if [ "$$(id -u)" = 0 ]; then $(STEP) "system packages (apt-get, Open vSwitch)" scripts/setup-system.sh; \
	else echo "make: not root, skipping system packages" >&2; fi

venv: $(STAMP)
$(STAMP): pyproject.toml
	@$(STEP) "python venv $(VENV) (pip install -e .[dev])" sh -c '\
	  { $(PYTHON) -m venv $(VENV) || { apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }; } && \
	  $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -e ".[dev]"'
	@touch $@

proto: $(PROTO_OUT) $(ETCD_PROTO_OUT)
$(PROTO_OUT): proto/ipam.proto $(STAMP)
	@$(STEP) "gRPC code (protoc)" $(PY) -m grpc_tools.protoc -Icore/_proto=proto --python_out=. \
	  --grpc_python_out=. --pyi_out=. core/_proto/ipam.proto

# etcd's own v3 API (vendored, see proto/etcd/README.md): stubs for core/etcd.py.
$(ETCD_PROTO_OUT): proto/etcd/rpc.proto proto/etcd/kv.proto proto/etcd/auth.proto scripts/gen_etcd_proto.py $(STAMP)
	@$(STEP) "etcd gRPC code (protoc)" $(PY) scripts/gen_etcd_proto.py

lint: setup
	$(BIN)/ruff check core cni ipamd agent tests scripts bench testbed
	$(BIN)/mypy core cni ipamd agent

unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# The whole suite: unit + integration (root, real netns, real OVS, real ipamd process).
test: setup
	$(BIN)/pytest tests $(PYTEST_ARGS)

# PyInstaller bundle (ovs-underlay-py, -ipam-py, -ipamd) + the native client, built as
# ovs-underlay and ovs-underlay-ipam (gcc).
binary: setup
	@$(STEP) "bundle dist/ovs-underlay (PyInstaller, gcc)" env PYTHON_BIN=$(abspath $(BIN)) scripts/build-bundle.sh

# The OCI image of the bundle, built offline: dist/ovs-underlay-<version>.oci.tar, named
# localhost/ovs-underlay:<version> (scripts/build_image.py; README "Install on Kubernetes").
image: binary
	@$(PY) scripts/build_image.py

cnitool:
	@$(STEP) "cnitool (Debian source, go build)" scripts/build-cnitool.sh build/cnitool

install: binary
	OVNK_ALIAS="$(OVNK_ALIAS)" scripts/install.sh "$(DESTDIR)" "$(PREFIX)" "$(CNI_BIN_DIR)" "$(EXAMPLES)"

demo: setup binary cnitool
	$(PY) scripts/demo.py $(if $(KEEP),--keep,)

# Three nodes' ipamds on one local etcd, pods of all three on one VLAN, the blocks per node.
demo-cluster: setup binary cnitool
	$(PY) scripts/demo_cluster.py

bench: setup binary
	$(PY) -m bench.run

bench-quick: setup binary
	$(PY) -m bench.run --quick

# 10,000 ADD/DEL through the frozen plugin at concurrency 8 on one node with faults (kill -9 of
# the plugin, the warm server and ipamd, an OVS restart, a full state dir), then one reconcile: a
# report in bench/results/soak-latest.md (exit 1 when the books do not balance). OPS=N for fewer.
soak: setup binary
	$(PY) -m bench.soak $(if $(OPS),--ops $(OPS),)

# The full cluster churn of issue 10 (2,000 ADD/DEL through the frozen ovs-underlay-ipam on 3
# nodes, every fault, a 30 s etcd outage): a report, not a test (CI runs a shorter one).
soak-cluster: setup binary
	$(PY) -m bench.soak_cluster $(if $(OPS),--ops $(OPS),)

# The node agent under 100 fault-injected applies (kill -9 at random steps, dead gateways, OVS
# restarts, interrupted rollbacks and removes): lost nodes must be 0. About 5 minutes.
bench-agent: setup
	$(PY) -m bench.agent_faults --runs $(or $(RUNS),100)

clean:
	rm -rf build dist $(VENV) .pytest_cache .mypy_cache .ruff_cache core/_proto/*_pb2*.py core/_proto/*_pb2*.pyi core/_proto/etcd/*_pb2*
