"""kubenode-exporter: a per-node Prometheus exporter for the Kubernetes dataplane."""

__version__ = "0.1.0"
