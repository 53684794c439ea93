"""Kubernetes logic: compact API objects, the watch, the desired-state model and the diff."""
