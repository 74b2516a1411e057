"""The contract between kvpilot's operator and worker: the Model API (CRD models), the
memory model, GPU and fleet descriptions. Pure Python: no kopf, kubernetes or torch."""
