# Two entry points: `make demo` (main job) and `make test` (the test suite). Each creates .venv
# with the exact versions in constraints.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint parity clean gpu-bundle

$(STAMP): setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/punkdiff demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

parity: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m parity

clean:
	rm -rf $(VENV) build *.egg-info

# What `bash benchmarks/gpu.sh` needs on a lent CUDA machine whose image has torch, accelerate, torchvision,
# safetensors, torchmetrics, pyarrow and huggingface_hub but no registry (docs/gpu.md): the wheels it lacks, at
# constraints.txt's versions, for CPython 3.12 on x86-64 Linux, in .whl/, and the mirrors the GPU figures train on
# (CelebA faces, CryptoPunks) in .device/datasets/. Both folders are ignored by git and travel as `carry`.
GPU_WHEELS := diffusers datasets dill multiprocess importlib_metadata lazy-importer \
	denoising-diffusion-pytorch ema-pytorch pytorch-fid
GPU_MIRRORS := celeba-faces cryptopunks
DATASETS ?= ../shared/datasets
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64

gpu-bundle:
	rm -rf .whl .device/datasets
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -c constraints.txt -d .whl $(GPU_WHEELS)
	mkdir -p .device/datasets
	for m in $(GPU_MIRRORS); do cp -r $(DATASETS)/$$m .device/datasets/ || exit 1; done
	@ls .whl
	@du -sh .whl .device
	@{ git ls-files -z -co --exclude-standard; printf '.whl\0.device\0'; } | du -cb --files0-from=- | tail -1 \
		| awk '{printf "the tree and the carried folders: %.1f MiB of the 64 MiB that travel\n", $$1 / 2^20; \
		         exit ($$1 > 64 * 2^20)}'
