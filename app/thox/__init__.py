"""Thox appliance: OpenAI-compatible API service, engine, model store and CLI."""

__version__ = "0.1.0"
