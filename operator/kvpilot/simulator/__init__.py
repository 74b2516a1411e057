"""The fleet simulator: a request trace through the operator's own placement and
autoscaling, compared with count-based scheduling and a static fleet (``kvpilot
simulate``). Pure Python; plots import matplotlib only when drawn."""

from kvpilot.simulator.engine import (
    Result, Settings, Simulation, Strategy, count_based, kvpilot, simulate, static,
)
from kvpilot.simulator.trace import Request, Shape, Workload, generate, read_azure_csv, read_jsonl

__all__ = [
    "Request", "Result", "Settings", "Shape", "Simulation", "Strategy", "Workload",
    "count_based", "generate", "kvpilot", "read_azure_csv", "read_jsonl", "simulate", "static",
]
