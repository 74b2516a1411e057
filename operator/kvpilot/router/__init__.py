"""The router: one OpenAI endpoint for the fleet (``kvpilot router``).

It routes each request by its ``model`` to a ready, non-draining replica of that Model
(from the EndpointSlices of the Model's Service), choosing among them by prefix affinity,
load and KV pressure (``scoring.pick``, a pure function), and passes the response through
as it streams. docs/router.md has the design and its figures.
"""
