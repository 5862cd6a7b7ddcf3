"""Hooks, patching and analysis on top of the traced graph."""
