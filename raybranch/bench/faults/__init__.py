"""Fault suite for the format-v2 store: ``python -m raybranch.bench.faults`` (see __main__)."""
