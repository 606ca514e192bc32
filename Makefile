# darkroom: `make demo` and `make test` are the two commands a new user runs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.darkroom-installed

.PHONY: demo test lint bench clean install chromium

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
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/queue_overhead.py

clean:
	rm -rf $(VENV) darkroom-data .pytest_cache
