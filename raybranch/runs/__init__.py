"""Runs that live in the store."""
