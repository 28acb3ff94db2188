"""Tests of mesh.artifacts: manifests, chunk plans, bitfields, the chunk store and publishing."""
