"""vLLM-compatible emulator: fake vLLM pods with real wire formats and modelled timing.

One pod (`server.EmulatorPod`) is a FastAPI app speaking vLLM's OpenAI API, Prometheus
metrics, KV events (ZMQ) and NIXL-style P/D transfers, with the engine model of `router/sim`
driven by the wall clock (`driver.EngineDriver`). A fleet (`fleet.EmulatedFleet`) runs pods as
separate processes and writes a kvroute config for them. `cli` wires `kvroute emulate`.
"""
