"""Timing fidelity: an emulated Llama-3.1-8B/H100 pod (a separate process, `--speedup 1`)
against the engine model's prediction for the same requests (TTFT of a 2,000-token prompt with
0% and 90% cached, mean inter-token latency at 1 and 64 concurrent sequences).

The prediction is a virtual-time `Engine` fed the same requests at the arrival times the pod
recorded. What is checked, and why these bounds: the pod's own view (`/admin/timings`, engine
hand-off to token delivery — the wall-clock driver alone) must match the prediction within
10% plus 5 ms, median of 3 (20% plus 5 ms for 64 streams, where the pod writes 6,400 SSE chunks
a second). The 5 ms are scheduling delay: this suite shares two cores with other work (load
averages of 3-6 while it was written), and a pod process that waits for a core delivers late;
on a quiet machine the server-side error is under 1% (see the benchmark).
The client's view adds HTTP, JSON and scheduling overhead that the GPU model does not contain
and that depends on what else the two cores are doing, so it is held to: never faster than the
model or the pod's own view, whichever is lower (by more than 5%: with 64 streams the pod's own
view may sit below the model within its 20%, measured 5.8% once), and at most 25 ms slower.
`benchmarks/emulator_timing.py` reports both views with their errors and applies the strict
10% to the client's view.
"""

from __future__ import annotations

from router.emulator.fidelity import measure
from router.emulator.fleet import EmulatedFleet

CASES = {"ttft_2000_cached_0pct", "ttft_2000_cached_90pct", "itl_1_seq", "itl_64_seqs"}


async def test_wall_clock_timing_matches_the_engine_model() -> None:
    async with EmulatedFleet(1, speedup=1.0, events="none") as fleet:
        pod = fleet.pods[0]
        host, port = pod.endpoint.rsplit(":", 1)
        results = await measure(
            host, int(port), pod.model, speedup=1.0, repeats=3, decode_tokens=24
        )
    assert {r.name for r in results} == CASES
    for r in results:
        what = (
            f"{r.name}: client {r.measured_s * 1e3:.2f} ms, server {r.server_s * 1e3:.2f} ms, "
            f"model {r.predicted_s * 1e3:.2f} ms"
        )
        rel = 0.20 if r.name == "itl_64_seqs" else 0.10
        assert abs(r.server_s - r.predicted_s) <= rel * r.predicted_s + 0.005, what
        assert r.measured_s >= 0.95 * min(r.predicted_s, r.server_s), what
        assert r.measured_s - r.predicted_s <= 0.025, what
