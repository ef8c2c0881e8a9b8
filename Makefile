# nomic-embed-grpc. `make serve` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODEL ?= nomic-ai/nomic-embed-text-v1.5
HOST ?= 0.0.0.0
PORT ?= 50051
VARIANT ?= auto
SERVE_ARGS ?=
PYTEST_ARGS ?=
# Test processes: most tests wait on servers in other processes, so two keep a 2-core host busy.
TEST_JOBS ?= 2
PROTO := protos/nomic_embed/v1/embed.proto
BUF := npx --yes @bufbuild/buf@1.75.0
# The released v1 API (a buf image): `make check-api` refuses changes that would break its clients.
API_BASELINE := api/baseline.yaml

.PHONY: install serve test lint protos check-protos buf-lint check-api api-baseline bench loadtest quality clean

install: $(STAMP)

# torch is pinned (pyproject.toml): a CPU host with the CPU wheel in pip's find-links gets the CPU
# build; a CUDA host gets PyPI's CUDA build. PIP_ARGS passes extra options, e.g. an index for torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m server --model $(MODEL) --host $(HOST) --port $(PORT) --variant $(VARIANT) $(SERVE_ARGS)

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

# The committed generated code must be what `make protos` writes.
check-protos: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO) && \
	for f in embed_pb2.py embed_pb2.pyi embed_pb2_grpc.py; do \
	  cmp -s $$tmp/nomic_embed/v1/$$f nomic_embed/v1/$$f || { echo "nomic_embed/v1/$$f is stale: run make protos"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated protobuf code is up to date"

buf-lint:
	@if command -v npx >/dev/null; then $(BUF) lint && echo "buf lint: clean"; else echo "npx not found: buf lint skipped"; fi

# Wire and generated-code compatibility with the released API (buf's FILE rules, see buf.yaml).
check-api:
	@if command -v npx >/dev/null; then $(BUF) breaking --against $(API_BASELINE) && echo "buf breaking: compatible with $(API_BASELINE)"; \
	else echo "npx not found: buf breaking skipped"; fi

# Run deliberately, when a release ships new API (docs/polyglot.md, "API compatibility").
api-baseline:
	$(BUF) build --exclude-source-info -o $(API_BASELINE)

lint: $(STAMP) buf-lint check-api
	$(VENV)/bin/ruff check .

test: lint check-protos
	$(PY) -m pytest -n $(TEST_JOBS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

# A bounded concurrency sweep over loopback (starts its own server unless LOADTEST_ARGS has --target).
loadtest: $(STAMP)
	$(PY) -m loadtest $(LOADTEST_ARGS)

# Each variant's cosine to fp32, memory against the estimate and speed (minutes; docs/quantization.md).
quality: $(STAMP)
	$(PY) -m scripts.quality $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
