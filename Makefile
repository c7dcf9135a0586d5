# Makefile: thin shortcuts around bin/pg-dev and confiture.py. `make` lists the targets.

PYTHON ?= python3
ENV ?= local
YES ?=
# YES=1 adds --yes: needed for deploy/restore/migrate on a protected env without a terminal
CONFIG ?= $(if $(wildcard confiture.toml),confiture.toml,confiture.toml.example)
VENV ?= .venv
PYTEST_ARGS ?=
# pytest-xdist workers, each with clusters of its own (test-gw0, remote-gw0, …): two cut the full
# suite's time by ~40% on 2 cores. PYTEST_WORKERS=0 runs it in-process (e.g. to use pdb).
PYTEST_WORKERS ?= 2

PGDEV := bin/pg-dev
# Every confiture call runs with the dev cluster's PG* variables (from bin/pg-dev env dev).
DEV := eval "$$($(PGDEV) env dev)" &&
CONFITURE := PYTHON=$(PYTHON) bin/confiture --config $(CONFIG) --env $(ENV) $(if $(YES),--yes)

.DEFAULT_GOAL := help
.PHONY: help demo test bench db-up db-down db-reset db-migrate db-status db-new db-backup \
	db-restore db-sync db-deploy db-watch clean clean-all

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## build the example shop database (sql/) on the local dev cluster
	$(PGDEV) start dev
	$(DEV) $(CONFITURE) scan && $(CONFITURE) template && $(CONFITURE) reset && $(CONFITURE) status

test: $(VENV)/.requirements ## run the test suite (PYTEST_ARGS=... to pass options)
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) tests $(PYTEST_ARGS)

$(VENV)/.requirements: tests/requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $@

bench: ## benchmark our commands against the raw PostgreSQL floor
	$(PGDEV) start bench && eval "$$($(PGDEV) env bench)" && $(PYTHON) bench/run.py

db-up: ## start the local dev cluster (bin/pg-dev start dev)
	$(PGDEV) start dev

db-down: ## stop the local dev cluster
	$(PGDEV) stop dev

db-reset: ## recreate the ENV database from its current template
	$(DEV) $(CONFITURE) reset

db-migrate: ## apply pending migrations to the ENV database
	$(DEV) $(CONFITURE) migrate up

db-status: ## the ENV database at a glance
	$(DEV) $(CONFITURE) status

db-new: ## create a migration: make db-new NAME=add_thing
	$(DEV) $(CONFITURE) migrate new $(or $(NAME),$(error usage: make db-new NAME=add_thing))

db-backup: ## back up the ENV database
	$(DEV) $(CONFITURE) backup

db-restore: ## restore a backup into the ENV database: make db-restore FILE=path|latest
	$(DEV) $(CONFITURE) restore $(or $(FILE),$(error usage: make db-restore FILE=path|latest))

db-sync: ## anonymized copy of production data into staging (per [sync])
	$(DEV) $(CONFITURE) sync

db-deploy: ## back up, migrate and verify the ENV database: make db-deploy ENV=prod YES=1
	$(DEV) $(CONFITURE) deploy

db-watch: ## rebuild and reset the ENV database whenever its files change
	$(DEV) $(CONFITURE) watch

clean: ## destroy every local cluster, remove .confiture/ and db/generated/
	for d in .confiture/pg/*/; do [ -d "$$d" ] && $(PGDEV) destroy "$$(basename "$$d")" || true; done
	rm -rf .confiture db/generated

clean-all: clean ## clean, and remove the virtualenv
	rm -rf $(VENV)
