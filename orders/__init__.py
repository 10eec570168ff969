"""Shared code of the order system: contracts, settings, database and JetStream plumbing, CLI."""
