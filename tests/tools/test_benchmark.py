"""tools/benchmark.py at tiny shapes on the CPU (the tool runs end to end and emits the peer's fields), the
ratio table of tools/bench_compare.py from recorded JSON lines, and tools/kernel_bench.py's shapes."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def bench(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark.py"), *args, "--tiny"],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def test_train_bench_emits_the_peer_fields_and_losses_fall_with_a_learning_rate():
    (row,) = bench("train-sft", "--batch", "2", "--seq", "32", "--steps", "5", "--losses", "--lr", "3e-3",
                   "--compute-dtype", "float32")
    for field in ("bench", "batch", "seq", "step_ms", "tokens_per_s", "mfu", "peak_gib", "compile_s"):
        assert field in row
    assert row["bench"] == "train-sft" and row["tokens_per_s"] > 0 and len(row["losses"]) == 8
    assert row["losses"][-1] < row["losses"][0]  # the same batch every step: it is being learned


def test_generate_bench_reports_each_batch():
    rows = bench("generate", "--gen-batches", "1", "2", "--prompt", "12", "--new-tokens", "16")
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["bench"] == "generate" and "ms_per_step" in r for r in rows)


@pytest.mark.parametrize("option,message", [(("--unroll", "0"), "--unroll must be >= 1, got 0"),
                                            (("--decode-splits", "-1"), "--decode-splits must be >= 0")])
def test_a_bad_option_is_refused_by_name(option, message):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "generate", "--tiny",
                           *option], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_compare_tabulates_ratios(tmp_path):
    rows = [{"peer": "torch", "bench": "train-sft", "batch": 8, "vision": "large256", "tokens_per_s": 40000},
            {"peer": "jax", "bench": "train-sft", "batch": 8, "vision": "large256", "tokens_per_s": 70000},
            {"peer": "torch", "bench": "generate", "batch": 1, "ms_per_step": 80.0},
            {"peer": "jax", "bench": "generate", "batch": 1, "ms_per_step": 2.0, "achieved_gbps": 1485},
            {"peer": "jax", "bench": "generate", "batch": 8, "ms_per_step": 2.0, "achieved_gbps": 2150,
             "device": "NVIDIA H200"},
            {"peer": "torch", "bench": "train-full", "batch": 4, "tokens_per_s": 30000},
            {"peer": "jax", "bench": "train-full", "batch": 4, "vision": "large256", "tokens_per_s": 45000}]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_compare.py"), "--tabulate", str(path)],
                         capture_output=True, text=True, timeout=60).stdout
    assert "1.75x" in out and "40.00x" in out and "50% of 2.97 TB/s" in out
    assert "50% of 4.30 TB/s" in out  # each card's own bandwidth
    assert "1.50x" in out  # train-full has no vision tower: the peer's row matches whatever ours names


def test_trace_summary_counts_busy_time_and_kernel_classes():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import trace_summary

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
    kernels = [("nvjet_sm90_tst_256x128_gemm", 0, 60), ("cudnn_generated_sdpa_fprop", 50, 30),  # overlap 10
               ("loop_multiply_fusion", 100, 20), ("ncclDevKernel_AllGather", 140, 10)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 1, "name": "host work", "ts": 0, "dur": 500})
    out = trace_summary.summarize(events, top=10, steps=2)
    assert "span 0.07 ms/step" in out            # 0 → 150 us, over 2 steps
    assert "GPU busy 0.06 ms/step (73.3%)" in out  # 80 + 20 + 10 us busy of 150
    for cls, ms in (("gemm", "0.03"), ("attention", "0.01"), ("other", "0.01"), ("collective", "0.01")):
        assert any(line.split()[:2] == [cls, ms] for line in out.splitlines()), (cls, out)
    assert "host work" not in out


def test_kernel_bench_covers_the_towers_projections_and_times_xla_off_hopper():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import kernel_bench

    # So400m/14 at 384 px: 729 patches per image; the MLP width 4304 is padded to whole kernel tiles (4352).
    shapes = {name: (m, k, n) for name, m, k, n, *_ in kernel_bench.projections("so400m384", batch=2)}
    assert shapes == {"q": (1458, 1152, 1152), "out_proj+res": (1458, 1152, 1152),
                      "fc1+gelu": (1458, 1152, 4352), "fc2+res": (1458, 4352, 1152)}
    rows = kernel_bench.main(["--vision", "large256", "--batch", "1", "--reps", "1"])
    assert [(r["projection"], r["m"], r["k"], r["n"]) for r in rows] == [
        ("q", 256, 1024, 1024), ("out_proj+res", 256, 1024, 1024), ("fc1+gelu", 256, 1024, 4096),
        ("fc2+res", 256, 4096, 1024)]
    # No Hopper GPU here: XLA's GEMM is timed (a difference of two loop timings: on 2 busy cores it may come out
    # near zero, so only its presence is checked), the kernel is not attempted.
    assert all(isinstance(r["xla_gemm_us"], float) and "kernel_us" not in r for r in rows)
