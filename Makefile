# darkroom: `make demo` and `make test` are the two commands a new user runs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.darkroom-installed

.PHONY: demo test lint bench bench-peers bench-peers-venv clean install chromium

install: $(STAMP)

# One install for everything: producer, worker, embedded services and test tools, pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[worker,embedded,dev]'
	# The optional invisible watermark: without its declared deps, which would add opencv-python (the GUI build,
	# owning the same cv2 module as opencv-python-headless); it runs on the headless build and PyWavelets.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -c constraints.txt invisible-watermark
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/darkroom demo

# The Flower and gallery tests drive Debian's headless Chromium (never a browser Playwright downloads).
chromium:
	test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/queue_overhead.py

# darkroom against optimum-intel, openvino-genai and diffusers (bench/peers.py). The peers run in their own venv:
# optimum-intel pins older transformers and diffusers than the project's. Models and IRs go to bench/.work/ and
# are reused by later runs. BENCH_PEERS_ARGS="--models sd15,bksdm-small --sizes 256,512" measures more.
PEERS_VENV := bench/.venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
BENCH_PEERS_ARGS ?= --models sd15 --sizes 256 --runs 3 --warmup 1

bench-peers-venv: $(PEERS_STAMP)

$(PEERS_STAMP): bench/peers-requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r bench/peers-requirements.txt
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python bench/peers.py $(BENCH_PEERS_ARGS)

clean:
	rm -rf $(VENV) darkroom-data .pytest_cache
