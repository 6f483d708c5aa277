"""Unit tests of thox.engine."""
