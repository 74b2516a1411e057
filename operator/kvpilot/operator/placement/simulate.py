"""Scale-down and defragmentation: does the fleet still hold everything without X?

One simulator for both directions, as Karpenter's disruption code reuses its
provisioning scheduler: take the snapshot, remove the replicas (or drain the nodes) in
question, and ask ``place()`` to hold every demanded replica again. The autoscaler asks
it before deleting a replica; defragmentation asks it whether emptying a node or moving
a replica frees GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from kvpilot.operator.placement.engine import place
from kvpilot.operator.placement.model import Demand, Plan, Policy, Snapshot


@dataclass(frozen=True)
class Simulation:
    holds: bool  # every demanded replica is placed without what was removed
    plan: Plan  # the plan that shows it (new homes for displaced replicas)
    gpus_before: int  # GPUs carrying load now, in the snapshot
    gpus_after: int

    @property
    def gpus_freed(self) -> int:
        return self.gpus_before - self.gpus_after


def snapshot_without(snapshot: Snapshot, replicas: Iterable[str] = (),
                     nodes: Iterable[str] = ()) -> Snapshot:
    """The snapshot with the named replicas gone and the named nodes cordoned, emptied."""
    drop, drain = set(replicas), set(nodes)
    return Snapshot(
        nodes=tuple(replace(n, cordoned=True) if n.name in drain else n for n in snapshot.nodes),
        replicas=tuple(e for e in snapshot.replicas
                       if e.name not in drop and e.node not in drain),
    )


def without(snapshot: Snapshot, demands: Sequence[Demand], policy: Policy = Policy(),
            replicas: Iterable[str] = (), nodes: Iterable[str] = ()) -> Simulation:
    """Whether ``demands`` still fit once ``replicas`` are gone and ``nodes`` drained.

    With the demand lowered by one, this is scale-down ("may I delete replica r?"); with
    the demand unchanged, it is a move ("can r live elsewhere, and does that free a
    GPU?"). Existing replicas that are not named stay where they are.
    """
    before = len({(e.node, g) for e in snapshot.replicas for g in e.gpus})
    after = place(snapshot_without(snapshot, replicas, nodes), demands,
                  replace(policy, rebalance=False))
    return Simulation(after.complete, after, before, after.gpus_used)
