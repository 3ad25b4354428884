"""The demo pipeline end to end at a reduced size (`tools/demo.py --quick`): every stage runs as the real
subprocess; the test checks the before/after table, the loss curves and the generated answer. The accuracy
claim belongs to the full demo (recorded in docs/LOG.md), not to this few-step run."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout

    # before/after table with every synthetic task, and the per-kind rows of the shapes questions
    assert "before" in text and "after" in text
    for task in ("synthetic_shapes_vqa", "synthetic_words_ocr", "synthetic_bar_chart", "synthetic_shapes_caption"):
        assert task in text
    for kind in ("color", "shape", "count"):
        assert f"└ {kind} questions" in text

    # loss curves copied next to the run, non-empty PNGs
    for stage in ("align", "sft"):
        png = out / f"loss_curve_{stage}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"loss_curve_{stage}.png" in text

    # one held-out question answered through the generate API
    assert "question:" in text and "true answer:" in text and "model answer:" in text
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["quick"] is True
    assert isinstance(summary["generate"]["answer"], str)
    assert summary["generate"]["truth"]
    assert set(summary["before"]["scores"]) == set(summary["after"]["scores"])
    assert "Total demo wall time" in text


def test_demo_refuses_existing_out(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "tools/demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--fresh" in proc.stderr
    assert (out / "keep.txt").exists()
