# cluster-backup: `make demo` runs it, `make test` tests it.  Both set up what
# they need: a virtual environment in .venv and rsync (apt-get when missing).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast trial bench reliability rsync venv clean

venv: $(STAMP)

# Editable in "compat" mode so twistd finds twisted/plugins in this tree.
$(STAMP): pyproject.toml setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "venv needs python3-venv; installing it"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
	  && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

rsync:
	@command -v rsync >/dev/null || { \
	  echo "installing rsync"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync; }

# systemd-analyze (Debian's systemd package), for tests/test_units.py: best
# effort, since a machine whose apt lacks it only skips that test.
.PHONY: systemd-analyze
systemd-analyze:
	@command -v systemd-analyze >/dev/null || { \
	  echo "installing systemd (for systemd-analyze)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends systemd; } \
	  || echo "systemd-analyze not available: tests/test_units.py will skip"

# A real cluster on this machine (127.0.0.x): see `cbackup demo --help`.
demo: $(STAMP) rsync
	$(VENV)/bin/cbackup demo --dir demo

# Every test once: the unit tests under trial (two workers, one a core),
# then the scenario tests (marked slow: real processes) under pytest.  Those
# mostly wait on their processes, so three workers run them, a test at a
# time each (every scenario test has its own addresses and folders).
test: $(STAMP) rsync systemd-analyze
	CBACKUP_SKIP_SLOW=1 HYPOTHESIS_PROFILE=ci $(PY) -m twisted.trial -j 2 tests
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -m slow -n 3 --dist load

test-fast: $(STAMP) rsync
	$(PY) -m pytest -m "not slow" -q

trial: $(STAMP) rsync
	$(PY) -m twisted.trial tests

# Every benchmark at its default size, then the large convergence case
# (1,000 stores x 1,000,000 files: several minutes), then the tight cases
# (issue 16: total quota 1.05, 1.1 and 1.2 x what the copies need, files
# up to half the smallest store, stores up to 10 x apart, against the same
# data with ample space); figures go to benchmarks/RESULTS.md.
TIGHT := --stores 40 --files 1200 --copies 2 --tail 0.5 --spread 0 --bandwidth 1e6
bench: $(STAMP) rsync
	for b in benchmarks/bench_*.py; do $(PY) $$b --record || exit 1; done
	$(PY) benchmarks/bench_convergence.py --stores 1000 --files 1000000 --record
	for s in 3 1.2 1.1 1.05; do \
	  $(PY) benchmarks/bench_convergence.py $(TIGHT) --spare $$s --record || exit 1; done

# The fault and abuse scenarios, recording their figures into docs/RELIABILITY.md.
reliability: $(STAMP) rsync
	CBACKUP_FIGURES_DIR=$(CURDIR)/docs/reliability $(PY) -m pytest -q \
	  tests/test_faults_client.py tests/test_faults_server.py tests/test_faults_source.py \
	  tests/test_abuse_*.py
	$(PY) docs/reliability/render.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis _trial_temp* *.egg-info twisted/plugins/dropin.cache
