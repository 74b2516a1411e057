"""The control side: placement of replicas on GPU nodes and, around it, the operator.

Decisions (placement, later autoscaling) are pure functions over snapshots; the kopf
handlers that read the cluster and apply a decision are a thin shell around them.
"""
