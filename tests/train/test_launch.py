"""launch/local_cpu.py: two processes (gloo collectives) train one job, agree on the loss and on each step's
length, write one checkpoint."""

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_processes_train_and_checkpoint_together(tmp_path):
    workdir = tmp_path / "run"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from ghostvis_jax.testing.tiny_training import tiny_train_config\n"
        "def get_config():\n"
        f"    return tiny_train_config({str(workdir)!r}, num_steps=3, checkpoint_every=100, log_every=1,\n"
        "                             grad_accum_steps=2,\n"
        "                             **{'data.batch_size': 4, 'data.max_length': 80, 'data.length_buckets': (34, 36)})\n")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "local_cpu.py"), "--num-processes", "2",
                           "--devices-per-process", "4", "--timeout", "400", "--", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=REPO, timeout=450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finals = dict(re.findall(r"process (\d)/2: step 3 final loss ([0-9.]+)", proc.stdout))
    assert set(finals) == {"0", "1"} and finals["0"] == finals["1"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    assert (workdir / "model" / "ghostvis_config.json").exists()
    assert "8 devices, 2 processes" in proc.stdout
    # Each step is cut to the bucket of its longest row on either process. The longest rows of steps 1 and 3 (37
    # tokens, over the last bucket) are on process 1; process 0's own rows (<= 36) would have picked 36 and run a
    # step of another shape than process 1's, which the collectives do not notice. Process 0 writes the metrics.
    lengths = [json.loads(x)["seq_len"] for x in open(workdir / "metrics.jsonl") if '"train"' in x]
    assert lengths == [80, 36, 80]
    # At 36 of 80 tokens the step's two micro-batches of 4 rows per process run joined, as one of 8.
    assert "16 rows per step = 2 micro-batch(es) of 8" in proc.stdout
    assert "compiled for 36 tokens per row (16 rows per step = 1 micro-batch(es) of 16)" in proc.stdout
