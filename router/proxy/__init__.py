"""`kvroute proxy`: the OpenAI-compatible face for users without a gateway.

Modules: `app` (ASGI app, lifetime, control endpoints), `forward` (one request's path through
admission, scheduling, retries and relaying), `relay` (ASGI reading/writing shared with the
sidecar), `upstream` (pooled connections to pods, failure classification), `pd` (the P/D
two-phase flow, shared with the sidecar), `admission` (per-model bounded queue), `health`
(ejection and re-admission of failed pods), `metrics` (our Prometheus metrics), `errors`
(OpenAI-shaped error bodies), `settings` (`ProxySettings`), `cli` (`kvroute proxy`).
"""
