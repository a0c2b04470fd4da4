"""Offline simulation of a vLLM fleet.

Engine model (paged KV cache, scheduler, step latency), workloads and traces, and the runner
that drives the routing core in virtual time.
"""
