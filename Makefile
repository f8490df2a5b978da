# The two commands a user needs: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup test demo data-eval data-full train-default eval-default bench bench-prune experiments clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[build,test]'
	touch $(STAMP)

setup: $(STAMP)

# Small harvest (LibreOffice catalogs only): a subset of the full test split, enough to evaluate.
data/harvest/DATA_CARD.json: | $(STAMP)
	$(PY) -m models.harvest --set eval --out data/harvest --cache data/cache

data-eval: data/harvest/DATA_CARD.json

data-full: $(STAMP)
	$(PY) -m models.harvest --set full --out data/harvest --cache data/cache --force

test: $(STAMP) data-eval
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x tests

demo: $(STAMP) data-eval
	$(VENV)/bin/packager build packs/demo.toml --out runs/demo
	@echo "report: runs/demo/report/index.html"

# Two phases, as the shipped weights were trained (about 3 hours alone on 2 cores): all 12
# directions evenly, then the same run extended with en->de,fr,es pairs seen three times.
train-default: data-full
	$(PY) -m models.train_default --minutes 90 --out models/default
	$(PY) -m models.train_default --minutes 165 --focus de,fr,es --focus-repeat 2 --out models/default

eval-default: $(STAMP) data-eval
	$(PY) -m models.evaluate_default --model models/default --data data/harvest --out models/default/EVAL.json

bench: $(STAMP)
	$(PY) -m bench.run_all

bench-prune: $(STAMP)
	$(PY) -m bench.prune_bench

experiments: $(STAMP) data-eval
	$(PY) -m packager.experiments --out runs/experiments

clean:
	rm -rf runs build *.egg-info
