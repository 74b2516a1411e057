"""What kvpilot's worker can serve, as opposed to what the Model API accepts.

The API accepts every Model the memory model can plan: placement, ``kvpilot plan`` and
the scale subresource work for it. The worker is narrower: GQA attention (multi-head
included), sliding-window layers in any pattern ``architecture.slidingWindow`` states
(each keeping only its window, as the memory model counts), one process per GPU and up
to ``WORKER_MAX_TENSOR_PARALLEL`` GPUs of a node per replica (tensor parallel), with
Triton kernels that take the head dimensions of ``WORKER_HEAD_DIMS``. A Model outside
that (DeepSeek's latent attention, a head dimension such as 112 or 192) is accepted and
planned, and the operator marks it with a condition carrying the reason below instead of
starting workers that would fail at load.

A Model has no ``model_type``, so this check goes by the architecture facts it states
(attention kind, head dimension). The worker serves the families of
``kvpilot.worker.model.FAMILIES``: Llama, Mistral (v0.1's window included), Qwen2/2.5
(q/k/v biases), Qwen3 (per-head q/k norms), Phi-3 (fused checkpoint tensors; the 4K
model's window) and Gemma 2 and 3 (local and global layers, soft-capping, sandwich
norms). Their switches are read from the checkpoint's ``config.json`` when the worker
loads it; a checkpoint of another ``model_type`` passes this check and fails at load,
the worker exiting with ``LoadFailed`` and a message naming the model_type.
"""

from __future__ import annotations

from typing import Optional

from kvpilot.api.model import ModelSpec

# What the worker's Triton kernels take (kvpilot.worker.kernels.paged_attention.HEAD_DIMS;
# a test holds the two equal): powers of two, and 80 and 96 (Phi-2, Phi-3) padded.
WORKER_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
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
