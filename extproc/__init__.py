"""Tollgate: an OpenAI-compatible gateway built from Envoy and this ext_proc sidecar."""

__version__ = "0.1.0"
