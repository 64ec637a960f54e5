"""Drive a benchmark script's GPU branch on CPU: runner.HAS_CUDA set, the device "cpu", a fake clock (each timed
closure runs once and reports fixed quantiles), a fake peak-memory probe and tiny copy/matmul reference
measurements. Nothing is timed; the tests check the rows' plumbing."""

ENV = {"gpu": "Test GPU", "torch": "t", "triton": "t", "commit": "abc1234"}
FAKE_MS = [1.0, 0.5, 2.0]


def fake_gpu(monkeypatch, runner, calls=None):
    """Patch `runner` (benchmarks/runner.py) for the GPU branch on CPU; `calls`, when given, collects the
    grad_to_none argument of every timed closure in order."""

    def fake_time(fn, *, warmup, rep, grad_to_none=None):
        fn()
        if calls is not None:
            calls.append(grad_to_none)
        return list(FAKE_MS)

    def fake_peak(fn, leaves):
        fn()
        return 0.0

    monkeypatch.setattr(runner, "HAS_CUDA", True)
    monkeypatch.setattr(runner, "DEVICE", "cpu")
    monkeypatch.setattr(runner, "time_fn", fake_time)
    monkeypatch.setattr(runner, "peak_memory_mb", fake_peak)
    monkeypatch.setattr(runner, "env_info", lambda: dict(ENV))
    monkeypatch.setattr(runner, "COPY_BYTES", 1 << 12)
    monkeypatch.setattr(runner, "MATMUL_MNK", (16, 16, 16))
