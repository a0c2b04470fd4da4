"""kvroute's Envoy face: the endpoint picker Envoy/Istio call over ext_proc (`kvroute serve`).

messages (wire vocabulary) → stream (per-request state machine) → servicer (gRPC) ← picker
(scheduler, parse, outcome) ; server wires them with health, metrics and the state feeds.
"""
