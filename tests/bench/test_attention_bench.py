"""bench/attention.py --quick on the CPU: its JSON has every case with all three implementations timed, flex and varlen
checked equal to dense, and the target judged only on a GPU."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("attention-bench") / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "attention.py"), "--device", "cpu", "--quick",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_run_description(quick_run):
    report, stdout = quick_run
    assert report["device"] == "cpu" and report["quick"] is True
    assert report["timed"] == "forward"  # torch runs flex_attention's backward only on CUDA
    assert report["shape"] == {"heads": 4, "kv_heads": 4, "head_dim": 64, "dtype": "float32"}
    assert report["skipped"] == {}
    assert report["flex_kernel"] == "torch.compile'd flex_attention (CPU)"
    assert report["varlen_kernel"] == "one causal sdpa call per document"
    assert report["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    assert "FORWARD ONLY" in stdout and "4 query heads, 4 kv heads, head dim 64, float32" in stdout


def test_every_case_timed_and_checked(quick_run):
    report, _ = quick_run
    cases = report["cases"]
    assert [(c["tokens"], c["documents"]) for c in cases] == [(t, d) for t in (256, 512) for d in (1, 4, 16)]
    for case in cases:
        tokens = case["tokens"]
        assert case["document_length"] == tokens // case["documents"]
        assert case["dense_mask_mib"] == tokens * tokens * 4 / 2**20
        results = case["results"]
        assert set(results) == {"dense", "flex", "varlen"}
        for name, result in results.items():
            assert set(result) == {"median_ms", "times_ms", "peak_mib", "speedup_vs_dense"}, name
            assert len(result["times_ms"]) == report["repetitions"] and min(result["times_ms"]) > 0
            assert result["median_ms"] == statistics.median(result["times_ms"])
            assert result["peak_mib"] is None  # no memory figure on a CPU rather than an invented one
            assert result["speedup_vs_dense"] == pytest.approx(results["dense"]["median_ms"] / result["median_ms"])
        assert results["dense"]["speedup_vs_dense"] == 1.0

        checks = case["checks"]
        assert set(checks) == {"flex", "varlen"}  # both compared with dense, the reference
        for name, result in checks.items():
            assert result["passed"] is True, (tokens, case["documents"], name, result)
            assert 0 <= result["output_max_abs_diff"] <= result["output_tolerance"] < 1e-3
            assert result["grad_max_abs_diff"] is None and result["grad_tolerance"] is None  # forward only


def test_target_reported_not_judged_on_cpu(quick_run):
    report, stdout = quick_run
    target = report["target"]
    case = next(c for c in report["cases"] if (c["tokens"], c["documents"]) == (512, 16))
    assert target == {"required": 1.4, "tokens": 512, "documents": 16,
                      "measured": case["results"]["flex"]["speedup_vs_dense"], "passed": None}
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("target (GPU): flex ≥ 1.4 × dense at 8,192 tokens, 16 documents: measured ")
    assert last.endswith("at 512 tokens, on cpu (forward only, target is for GPU)")
    assert "PASS" not in last and "FAIL" not in last
