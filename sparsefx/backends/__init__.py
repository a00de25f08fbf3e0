"""Backends that run a (pruned) model and measure it."""
