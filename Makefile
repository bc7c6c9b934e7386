# I-FAS trainer: `make train` runs the demo end to end on CPU, `make test` runs the test suite.
# Both create the virtualenv and install the pinned dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; on a GPU machine e.g. TORCH_SPEC="torch==2.13.0 --index-url <CUDA index>".
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA ?= data/demo
DEMO_SAMPLES ?= 1000
NUM_RANKS ?= 2
PYTEST_ARGS ?=
# The torchvision tier: a second venv where transformers builds every processor whole (video processors need
# torchvision, which does not import beside the CPU torch above); PyPI's pair that imports together.
TV_VENV ?= .venv-tv
TV_BIN := $(TV_VENV)/bin
TV_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-torchvision demo-data train grpo lint test test-torchvision bench gpu-wheels clean

$(BIN)/.installed: requirements.txt requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

$(TV_BIN)/.installed: requirements.txt requirements-dev.txt setup.py
	test -x $(TV_BIN)/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_BIN)/pip install -q --upgrade pip
	# the pinned requirements but triton, whose pin (3.9) the torch of this pair does not admit (it brings its own)
	grep -v -e '^triton==' requirements.txt > $(TV_VENV)/requirements.txt
	$(TV_BIN)/pip install -q $(TV_TORCH_SPEC) -r $(TV_VENV)/requirements.txt $$(grep -v '^-r' requirements-dev.txt)
	$(TV_BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install-torchvision: $(TV_BIN)/.installed

$(DEMO_DATA)/domain_d/manifest.json: | $(BIN)/.installed
	$(BIN)/ifas-shards synth --out $(DEMO_DATA) --samples-per-domain $(DEMO_SAMPLES) --seed 0 --workers 2

demo-data: $(DEMO_DATA)/domain_d/manifest.json

train: install demo-data
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=1 deepspeed --num_gpus $(NUM_RANKS) launch/train.sh --config launch/configs/demo.yaml $(ARGS)

# The second stage: GRPO from the SFT demo run (runs/demo, made by `make train` first if it is not there)
runs/demo/train_result.json:
	$(MAKE) train

grpo: install demo-data runs/demo/train_result.json
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=1 deepspeed --num_gpus $(NUM_RANKS) launch/train.sh --config launch/configs/demo_grpo.yaml $(ARGS)

lint: install
	$(BIN)/ruff check .

test: install lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest tests $(PYTEST_ARGS)
	$(MAKE) test-torchvision

# The processors as transformers builds them with torchvision (tests marked torchvision; skipped in the first tier)
test-torchvision: install-torchvision
	PATH=$(abspath $(TV_BIN)):$$PATH $(TV_BIN)/python -m pytest tests -m torchvision $(PYTEST_ARGS)

bench: install
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=1 $(BIN)/python -m kernels.bench
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=1 $(BIN)/python -m trainer.bench

# The wheels a GPU machine without network lacks, for launch/gpu_check.sh (needs the package index).
gpu-wheels: install
	$(BIN)/python launch/gpu_wheels.py download .whl

clean:
	rm -rf runs/demo runs/demo_grpo $(DEMO_DATA)
