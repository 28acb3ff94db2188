# fleetmesh: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Real .tflite models from the mediapipe 0.10.21 wheel (newer wheels ship none).
# Only the wheel is downloaded and unzipped: installing mediapipe would pin protobuf<5.
MODELS := .cache/models
MEDIAPIPE_STAMP := $(MODELS)/mediapipe/.stamp

.PHONY: install models demo test test-tflite-runtime bench protos lint clean deps-apt test-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fleetmesh needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(MEDIAPIPE_STAMP): | $(STAMP)
	mkdir -p $(MODELS)/wheels $(MODELS)/mediapipe
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
	    --platform manylinux_2_28_x86_64 \
	    -d $(MODELS)/wheels mediapipe==0.10.21
	$(BIN)/python -c 'import sys, zipfile, pathlib; z = zipfile.ZipFile(sys.argv[1]); out = pathlib.Path(sys.argv[2]); \
	    [out.joinpath(pathlib.Path(n).name).write_bytes(z.read(n)) for n in z.namelist() if n.endswith(".tflite")]' \
	    $$(ls $(MODELS)/wheels/mediapipe-0.10.21-*.whl | head -1) $(MODELS)/mediapipe
	touch $@

models: $(MEDIAPIPE_STAMP)

demo: install models
	$(BIN)/mesh demo

# Debian packages the tests use: promtool (in `prometheus`) checks and unit-tests the alert
# rules. Installed only when missing; with --no-install-recommends, and no init system in CI
# containers, nothing is started.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps-apt:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

# The suite's chaos smoke test needs root (network namespaces) and the chaos tools: as root (CI) they
# are installed here; otherwise the smoke test is skipped and says why.
test-deps: deps-apt
	@if [ "$$(id -u)" != 0 ]; then \
	    echo "make test: not root: the chaos smoke test will be skipped (run as root to include it)"; \
	elif ! $(MAKE) --no-print-directory chaos-deps; then \
	    echo "make test: the chaos tools could not be installed: the chaos smoke test will be skipped"; fi

test: install models test-deps
	$(BIN)/python -m pytest
	$(MAKE) test-tflite-runtime

# The inference tests once more on tflite-runtime (numpy<2) in a separate venv, .venv-tflite:
# the runtime many devices still ship. LiteRT-only tests (quantisation) are skipped there.
test-tflite-runtime: models
	scripts/test-tflite-runtime.sh

# Every benchmark under bench/, one after another (each prints its figures, the last line one JSON
# object); a new bench is added to this list (tests/deploy/test_make.py checks none is missing).
BENCHES := membership distribution inference consensus rollout scale sim

bench: install models
	@set -e; for name in $(BENCHES); do echo "== bench/$$name.py"; $(BIN)/python bench/$$name.py; done

# ruff (style, imports, bugbear, pyupgrade, simplify) and mypy (strict on the pure cores), as CI runs them.
lint: install
	$(BIN)/ruff check mesh tests bench chaos protos scripts
	$(BIN)/mypy mesh

protos: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .venv-tflite demo-run .pytest_cache .hypothesis .cache

.PHONY: chaos-deps chaos chaos-smoke

# The chaos suite's system tools, from Debian's packages, installed only when missing (needs root).
# iproute2: network namespaces, veths, tc; nftables/iptables: partitions and loss; faketime/libfaketime:
# clock skew; stress-ng: a CPU hog beside runs. Checked by package, so any architecture's paths do.
CHAOS_DEBS := iproute2 nftables iptables faketime libfaketime stress-ng

chaos-deps:
	@missing=""; for pkg in $(CHAOS_DEBS); do \
	    dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	    echo "chaos-deps: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "chaos-deps: $(CHAOS_DEBS) already installed"; fi

# The scenario matrix (root), ends with one JSON line. Seeds rotate: the i-th scenario runs under the
# i-th seed, cycling, and a few scenarios again, so that every nemesis family meets at least two seeds
# (31 runs, 26.6 min measured on a fresh clone, 2 cores). Every scenario under every seed:
# `python -m chaos matrix --seeds 1,2,3`, about 19 min per seed.
CHAOS_SEEDS ?= 1,2,3
chaos: install models chaos-deps
	$(BIN)/python -m chaos matrix --seeds $(CHAOS_SEEDS) --rotate

# One short run of the smoke scenario (one partition, one kill, every checker).
chaos-smoke: install models chaos-deps
	$(BIN)/python -m chaos run smoke --seed 1
