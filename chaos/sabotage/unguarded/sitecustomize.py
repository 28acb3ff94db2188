"""A broken build of the node, for a chaos negative only: the guard allows every decision.

`ClusterPlan(sabotage="unguarded")` puts this folder first on the node processes' PYTHONPATH, so
Python imports it at start-up (before the node's own modules) and every site group's ledger applies
decisions above the policy's scope at once, with no operator approval. The `guard_scope` checker must
then fail (tests/chaos/test_negative.py): a checker that cannot fail proves nothing. The product has
no switch for this; only this file, outside the package, breaks it.
"""

import sys

import mesh.guard.core as _core

_decide = _core.decide


def _allow_everything(decision, policy, group_size):
    verdict = _decide(decision, policy, group_size)
    return _core.Verdict(_core.VerdictOutcome.ALLOW, verdict.scope, verdict.limits)


_core.decide = _allow_everything
print("chaos sabotage: this node's guard allows every decision (a test build)", file=sys.stderr)
