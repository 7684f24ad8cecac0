"""Benchmarks of the Ray layer (the checkpoint actor, branches on Ray Train, an S3 outage under the actor)."""
