"""The memory breakdown reads the allocator's trace correctly (synthetic traces; no GPU needed)."""
from harness.memtrace import StepMemory, format_breakdown, graph_pool_bytes, peak_breakdown


def _ev(action, addr, size, file="harness/x.py", line=1):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": f"/venv/site-packages/torch/{'utils'}/checkpoint.py", "line": 9, "name": "cp"},
                       {"filename": f"/repo/{file}", "line": line, "name": "f"}]}


def test_peak_breakdown_finds_the_peak_and_what_was_alive():
    MiB = 2**20
    trace = [
        _ev("alloc", 1, 100 * MiB, "harness/a.py", 10),
        _ev("alloc", 2, 50 * MiB, "kernels/b.py", 20),
        _ev("free_completed", 1, 100 * MiB),
        _ev("alloc", 3, 30 * MiB, "kernels/b.py", 20),    # 80 MiB: below the earlier 150
        _ev("free_completed", 999, 7 * MiB),              # a block from before the trace: ignored
        _ev("alloc", 4, 200 * MiB, "transformers/c.py", 30),  # 280 MiB: the peak
        _ev("free_completed", 4, 200 * MiB),
    ]
    b = peak_breakdown({"device_traces": [trace]})
    assert b["peak"] == 280 * MiB
    sites = {s.split()[0]: (nbytes, n) for s, nbytes, n in b["sites"]}
    assert sites == {"/repo/transformers/c.py:30": (200 * MiB, 1), "/repo/kernels/b.py:20": (80 * MiB, 2)}
    assert "0.273 GiB" in format_breakdown(b)


def test_graph_pool_bytes_counts_private_pools_only():
    snap = {"segments": [{"segment_pool_id": (0, 0), "total_size": 10},
                         {"segment_pool_id": (1, 2), "total_size": 32},
                         {"segment_pool_id": [1, 3], "total_size": 8}]}
    assert graph_pool_bytes(snap) == 40


def test_step_memory_is_empty_off_cuda():
    m = StepMemory("cpu")
    m.begin()
    m.end()
    assert m.summary() == {}
