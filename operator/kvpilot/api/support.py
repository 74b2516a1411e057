"""What kvpilot's worker can serve, as opposed to what the Model API accepts.

The API accepts every Model the memory model can plan: placement, ``kvpilot plan`` and
the scale subresource work for it. The worker is narrower: Llama-style GQA, one process
per GPU and up to ``WORKER_MAX_TENSOR_PARALLEL`` GPUs of a node per replica (tensor
parallel), every layer attending over the whole context, with Triton kernels that take
a head dimension that is a power of two from 16 to 256. A Model outside that
(Phi-3-mini's headDim of 96, DeepSeek's latent attention, Mistral-7B v0.1's or Gemma's
sliding windows) is accepted and planned, and the operator marks it with a condition
carrying the reason below instead of starting workers that would fail at load.
"""

from __future__ import annotations

from typing import Optional

from kvpilot.api.model import ModelSpec

WORKER_HEAD_DIMS = (16, 32, 64, 128, 256)
# The most GPUs one replica's worker drives, one process per GPU (its rank 0 starts the
# others; kvpilot.worker.parallel). Nothing in the worker is tied to a degree: 16 is the
# most GPUs a node has (placement keeps a replica on one node). Which degrees a Model can
# be split by is the memory model's tp_is_valid.
WORKER_MAX_TENSOR_PARALLEL = 16


def worker_support_problem(spec: ModelSpec, tp: Optional[int] = None) -> Optional[str]:
    """Why kvpilot's worker cannot serve ``spec``, or None when it can.

    ``tp`` is the tensor-parallel degree placement resolved (for ``tensorParallel:
    auto``); without it only a fixed degree in the spec is checked.
    """
    problems = []
    arch = spec.architecture
    if arch.attention != "gqa":
        problems.append(
            f"architecture.attention {arch.attention}: the worker's engine runs "
            "Llama-style GQA attention only")
    if arch.sliding_window is not None:
        problems.append(
            "architecture.slidingWindow: the worker's engine has no sliding-window "
            "attention (every layer attends over the whole context)")
    head_dim = arch.head_dim
    if head_dim not in WORKER_HEAD_DIMS:
        problems.append(
            f"architecture.headDim {head_dim} is not one the worker's attention kernels "
            f"take ({', '.join(map(str, WORKER_HEAD_DIMS))})")
    degree = tp if tp is not None else spec.tensor_parallel
    if degree != "auto" and degree > WORKER_MAX_TENSOR_PARALLEL:
        problems.append(
            f"tensorParallel {degree}: a worker drives at most {WORKER_MAX_TENSOR_PARALLEL} "
            "GPUs, so a replica cannot span more")
    if not problems:
        return None
    return "; ".join(problems) + " (the Model is planned, but no worker serves it)"
