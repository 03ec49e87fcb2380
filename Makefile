# Two entry points: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench-cpu gpu-bundle clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch (a plain `pip install torch` would pull the multi-GB CUDA build)
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlab train configs/demo.yaml --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	@# the report test renders the page in headless Chromium; install it when we may
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) ; } || \
		echo "chromium not installed: the browser check of the report will be skipped"
	@# the PostgreSQL sweep test starts its own server from Debian's binaries (kept off PATH); install them when we may
	@{ command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive && \
		(apt-get install -y -q postgresql >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1)) ; } || \
		echo "postgresql not installed: the PostgreSQL sweep tests will be skipped"
	@# two workers, one per core (each test pins torch to one thread); a file's tests share a worker, as they
	@# share its module fixtures
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

bench-cpu: $(STAMP)
	$(BIN)/peftlab bench --scenario cpu-sst2
	$(BIN)/peftlab bench --scenario cpu-imdb

# what a bare GPU machine lacks, for bench/gpu-check in one device call (docs/gpu.md); ignored by git, <= 60 MB
gpu-bundle: $(STAMP)
	$(BIN)/python bench/gpu_bundle.py --out .gpu-bundle

clean:
	rm -rf $(VENV) .pytest_cache
