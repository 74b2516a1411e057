"""The data side of kvpilot: the decode engine that runs inside a worker pod.

``kvpilot.worker.kernels`` holds the GPU kernels (Triton) with a plain PyTorch reference
beside each; only this package imports torch and Triton, so the operator side
(``kvpilot.api``, ``kvpilot.operator``) stays importable without them.
"""
