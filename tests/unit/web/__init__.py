"""Unit tests of thox.web."""
