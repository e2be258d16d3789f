# Two commands do everything (see README.md):
#   make quickstart   build the environment if missing, then train, evaluate and write figures
#   make test         build the environment if missing, then run pytest and nbval over every notebook
#   make lab          build the environment if missing, then open the course in JupyterLab at notebooks/
#   make figures      build the environment if missing, then redraw every figure into figures/ (full size)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: quickstart test lab figures env clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

env: $(STAMP)

quickstart: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/kdpo quickstart --out outputs/quickstart  # one thread: faster for tiny models, and the README's numbers

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks

figures: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/kdpo figures --out figures

test: $(STAMP)
	KDPO_FAST=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest -q tests
	KDPO_FAST=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks

clean:
	rm -rf $(VENV) outputs runs
