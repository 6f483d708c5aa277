"""Unit tests of thox.api."""
