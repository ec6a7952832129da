# Two commands set up a fresh machine: `make demo` (the shard job on the embedded dataset) and `make test`.
PYTHON ?= python3

.PHONY: install demo train-demo test
install:
	$(PYTHON) -m pip install -q --isolated torch==2.13.0 torchvision==0.28.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	bash infra/demo.sh

train-demo:   # after `make demo`: a sample recipe as a Ray job, 2 Ray Train workers
	bash infra/train_demo.sh

test: install
	$(PYTHON) -m pytest -q -ra
