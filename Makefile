# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/*.proto)
PROTO_GEN := $(PROTO_SRC:.proto=_pb2.py)

.PHONY: venv proto demo test test-fast bench clean

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

test: venv proto
	$(PY) -m pytest -q tests

test-fast: venv proto
	$(PY) -m pytest -q tests -m "not cluster and not chaos"

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
