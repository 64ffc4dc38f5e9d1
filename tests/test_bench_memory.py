"""The memory benchmark's model (benchmarks/memory_model.py) on hand-made numbers: the fit recovers known
coefficients, the held-out error is (predicted - measured) / measured, the 7B step's peak adds the static part to
the largest phase; and its phase meter on a known allocation (the live-tensor figure; RSS is not asserted)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mm():
    sys.path.insert(0, str(BENCH))  # memory_model imports nothing of benchmarks/, bench_memory imports ppo_step
    spec = importlib.util.spec_from_file_location("memory_model", BENCH / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def shapes(mm):
    return [mm.qwen2_shape(h, n, v) for h, n, v in
            ((256, 4, 16384), (256, 8, 16384), (512, 4, 16384), (256, 4, 65536), (384, 6, 32768), (384, 2, 8192),
             (512, 8, 49152))]


def test_fit_recovers_known_coefficients_and_heldout_error(mm):
    wl, heavy = mm.Workload(rows=8, prompt=64, response=64), mm.Workload(rows=8, prompt=448, response=16)
    truth = {"update": np.array([3.0, 2.0, 2.5, 1.0, 0.7, 0.5, 5e6]),
             "scoring": np.array([1.5, 2.0, 1.0, 0.7, 3.0, 1e6])}
    for phase, coef in truth.items():
        def point(s, w):
            return mm.Point(s, w, 4, float(mm.features(phase, s, w, 4) @ coef) + mm.known_bytes(phase, s, w))
        train = [point(s, w) for s in shapes(mm)[:6] for w in (wl, heavy)]  # the bench's fit points
        np.testing.assert_allclose(mm.fit(phase, train), coef, rtol=1e-6)
        guess, err = mm.heldout_error(phase, train, point(shapes(mm)[6], wl))
        assert guess == pytest.approx(point(shapes(mm)[6], wl).peak) and abs(err) < 1e-6
    # the held-out error is (predicted - measured) / measured, in percent
    s = shapes(mm)
    pts = [mm.Point(x, w, 4, float(mm.features("scoring", x, w, 4) @ truth["scoring"]), "") for x in s[:6]
           for w in (wl, heavy)]
    held = replace(pts[0], shape=s[6], peak=200e6)
    expected = float(mm.features("scoring", s[6], wl, 4) @ truth["scoring"])
    assert mm.heldout_error("scoring", pts, held) == pytest.approx((expected, 100 * (expected - 200e6) / 200e6))


def test_features_follow_the_levers(mm):
    s, wl = mm.qwen2_shape(256, 4, 16384), mm.Workload(rows=8, prompt=64, response=64)
    kv, prefill, sampling, attention, head, _ = mm.features("rollout", s, wl, 2)
    assert head == 16384 * 256 * 4 and attention == 8 * 4 * 64**2 * 4
    assert kv == 2 * 4 * 8 * 128 * s.kv_dim * 2 and sampling == 8 * 16384 * 4 and prefill == 8 * 64 * (256 + 1344) * 2
    act, block, logits, lse, attention, _, const = mm.features("update", s, replace(wl, micro=2), 2)
    assert attention == 2 * 4 * 128**2 * 4
    assert lse == logits  # 2 x 64 x 16384 logits: under one logsumexp chunk of 2**24
    assert mm.features("scoring", s, replace(wl, rows=64, response=512), 2)[2] == 2**24 * 4
    assert (act, logits, const) == (2 * 128 * 4 * 256 * 2, 2 * 64 * 16384 * 4, 1.0)
    assert mm.features("update", s, replace(wl, logprob_chunk=100), 2)[2] == 100 * 16384 * 4  # one chunk's logits
    assert mm.features("rollout", s, replace(wl, chunk=2), 2)[0] == kv / 4


def test_step_peak_is_static_plus_largest_phase(mm):
    s, wl = mm.QWEN25_7B, mm.WORKLOAD_7B
    assert s.parameters() == pytest.approx(7.62e9, rel=0.01)  # Qwen2.5-7B: 7.6B parameters
    coefs = {p: np.zeros(len(mm.FEATURES[p])) for p in mm.PHASES}
    coefs["scoring"][-1] = 3 * 2**30  # const: 3 GiB
    coefs["scoring"][-2] = 5.0  # the CPU-only head term: dropped from the GPU prediction
    lever = mm.Lever("bfloat16", True, 4)
    out = mm.predict_step(mm.gpu_coefficients(coefs, None), s, wl, lever, value_head=False)
    static = s.parameters() * 2 + 12 * s.lora_parameters(16)
    assert out["peak"] == pytest.approx(static + max(3 * 2**30, 4 * s.lora_parameters(16)))
    assert mm.fits(0.89 * 24 * 2**30, 24) and not mm.fits(0.91 * 24 * 2**30, 24)
    # a bfloat16 base's logits coefficient: at least the float32 family's + 0.5
    f32 = {p: np.full(len(mm.FEATURES[p]), 2.0) for p in mm.PHASES}
    gpu = mm.gpu_coefficients(coefs, f32)
    assert gpu["update"][mm.FEATURES["update"].index("logits")] == 2.5 and gpu["scoring"][-2] == 0.0


def test_phase_meter_counts_live_tensor_bytes(mm):
    torch = pytest.importorskip("torch")
    import bench_memory

    meter = bench_memory.PhaseMeter(cuda=False, profile=True)
    with meter("alloc"):
        a = torch.ones(1_000_000)  # 4 MB alive at the end
        b = torch.ones(500_000)
        del b  # 2 MB more at the peak
    record = meter.phases["alloc"]
    assert record["tensors"] >= 6_000_000 and record["tensors_net"] >= 4_000_000 and "rss" in record
    assert a.sum() == 1_000_000
