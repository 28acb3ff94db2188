"""fleetmesh's chaos suite: real node processes in network namespaces, faults applied from
outside them, a workload with a recorded history, invariant checkers, seeds and reports.

Run as root: `python -m chaos run SCENARIO --seed S`, `python -m chaos matrix`,
`python -m chaos cleanup`. See chaos/README.md.
"""
