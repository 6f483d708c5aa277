"""Unit tests of thox.store."""
