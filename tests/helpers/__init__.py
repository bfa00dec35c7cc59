"""Shared test helpers: real event-file readers and LightningModules that record their own oracles."""
