# kubenode-exporter: `make run` serves this machine's metrics; `make test` runs every lane.
PORT ?= 9815
PY := .venv/bin/python

.PHONY: setup setup-test run test test-host test-kernel bench dashboards bundle lint clean

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

run: setup
	.venv/bin/kubenode-exporter --web.listen-address :$(PORT)

# Every lane, as CI runs it: host (real ipset namespaces, cgroup v1, Prometheus,
# Alertmanager, promtool), then the kernel VM (real IPVS, cgroup v2).
test: setup-test
	$(MAKE) --no-print-directory test-host test-kernel

test-host:
	$(PY) -m pytest tests

test-kernel:
	$(PY) -m tests.kernel.lane

# Alerts, dashboards and their operator / sidecar renderings, from tools/bundle/config.yaml
# (needs the dashboards extra: make setup-test); then deploy/'s copies for kustomize.
bundle:
	$(PY) -m tools.bundle
	$(PY) deploy/sync_bundle.py

dashboards: bundle

bench: setup-test
	$(PY) -m bench

clean:
	rm -rf .venv .cache build *.egg-info
