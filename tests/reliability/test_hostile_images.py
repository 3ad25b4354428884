"""Hostile images through every entry point that takes one: the decoder (with memory and time bounds), the
training pipeline (skips counted per dataset), `generate`, and the chat CLI (a subprocess fed through stdin)."""

import json
import os
import subprocess
import sys
import textwrap

import datasets
import pytest
from datasets import Features, Image, List, Value

from ghostvis_jax.config import GhostVisConfig, ResamplerConfig, SiglipConfig
from ghostvis_jax.data import pipeline
from ghostvis_jax.data.images import ImageDecodeError, load_image, preprocess_image

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_RSS_GROWTH_MB = 300  # decoding the 50,000 x 50,000 "image" would need 7.5 GB


def test_decoder_each_image_works_or_is_rejected_naming_it(hostile_images, ledger, request):
    check_decoded = request.getfixturevalue("check_decoded_fn")
    for name, (path, expected) in hostile_images.items():
        try:
            img = load_image(path)
            px = preprocess_image(img, SiglipConfig(image_size=16))
        except ImageDecodeError as e:
            named = path in str(e)
            ledger.record("images: decoder", name, "clear error" if named else "crash", str(e)[:120])
            assert named and expected == "reject", (name, str(e))
            continue
        except Exception as e:  # noqa: BLE001
            ledger.record("images: decoder", name, "crash", repr(e))
            raise
        try:
            check_decoded(name, img)
            assert px.shape == (16, 16, 3) and px.dtype.name == "float32"
        except AssertionError:
            ledger.record("images: decoder", name, "silent corruption")
            raise
        ledger.record("images: decoder", name, "worked", f"{img.size[0]}x{img.size[1]} RGB")
        assert expected == "ok", name


def test_decoder_memory_and_time_are_bounded(hostile_images, ledger):
    """Each image decoded in a fresh subprocess-wide loop; peak RSS growth and time per image are measured."""
    script = textwrap.dedent("""
        import json, resource, sys, time
        from ghostvis_jax.data.images import ImageDecodeError, load_image
        out = {}
        for name, path in json.loads(sys.argv[1]).items():
            before, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
            try:
                load_image(path)
                outcome = "decoded"
            except ImageDecodeError:
                outcome = "rejected"
            out[name] = {"outcome": outcome, "seconds": time.perf_counter() - t,
                         "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
        print(json.dumps(out))
    """)
    paths = {n: p for n, (p, _) in hostile_images.items()}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    worst = max(stats.values(), key=lambda s: s["rss_growth_mb"])
    assert all(s["rss_growth_mb"] < MAX_RSS_GROWTH_MB and s["seconds"] < 5 for s in stats.values()), stats
    assert stats["PNG header claiming 50000x50000"]["outcome"] == "rejected"
    ledger.record("images: decoder", "memory/time bound over all 15 (own process)", "worked",
                  f"max RSS growth {worst['rss_growth_mb']:.0f} MB, max "
                  f"{max(s['seconds'] for s in stats.values()):.2f} s")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import transformers

    from ghostvis_jax.testing.tiny_tokenizer import build_tiny_tokenizer

    return transformers.AutoTokenizer.from_pretrained(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _model_config(tokenizer):
    return GhostVisConfig(vision=SiglipConfig(image_size=16), resampler=ResamplerConfig(num_latents=4),
                          image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))


VQA = Features({"image": Image(), "question": Value("string"), "answers": List(Value("string"))})


def _vqa_folder(root, images: dict[str, str]) -> str:
    rows = [{"image": {"bytes": open(path, "rb").read(), "path": os.path.basename(path)},
             "question": f"what is {name}?", "answers": ["a thing"]} for name, path in images.items()]
    os.makedirs(root, exist_ok=True)
    datasets.Dataset.from_list(rows, features=VQA).to_parquet(os.path.join(root, "train-00000.parquet"))
    return root


def test_pipeline_counts_skips_per_dataset(hostile_images, tokenizer, ledger, tmp_path):
    """Two datasets in one mixture: every hostile image in `textvqa`, only good ones in `okvqa`. Rows with a
    rejected image are skipped and counted under their dataset; the others are trained on."""
    hostile = _vqa_folder(str(tmp_path / "hostile"), {n: p for n, (p, _) in hostile_images.items()})
    good = _vqa_folder(str(tmp_path / "good"), {n: p for n, (p, e) in hostile_images.items() if e == "ok"})
    n_bad = sum(e == "reject" for _, e in hostile_images.values())
    n_all = len(hostile_images)
    cfg = {"recipe": None, "batch_size": 4, "max_length": 64, "num_threads": 1, "token_estimate_samples": 16,
           "datasets": {"textvqa": {"path": hostile, "schema": "textvqa"}, "okvqa": {"path": good, "schema": "okvqa"}}}
    it = pipeline.make_train_iterator(cfg, tokenizer, _model_config(tokenizer), seed=0, process_index=0,
                                      process_count=1)
    for _ in range(30):
        batch = next(it)
        assert batch["pixel_values"].shape == (4, 16, 16, 3)
    counts = it.counts()
    skipped = counts["skipped"]
    assert set(skipped) == {"textvqa"}, counts  # the clean dataset never skips
    read = counts["rows"]["textvqa"] + skipped["textvqa"]["unreadable image"]
    # textvqa was read through at least once: its skips are exactly the rejected images' share
    assert read >= n_all and abs(skipped["textvqa"]["unreadable image"] / read - n_bad / n_all) < 0.2, counts
    source = pipeline.build_source("textvqa", {"schema": "textvqa"}, pipeline.resolve_data_config(cfg),
                                   split="train", image_size=16, path=hostile)
    for i, (name, (_, expected)) in enumerate(hostile_images.items()):
        row = source[i]
        if "skipped" in row:
            assert expected == "reject" and row["skipped"] == "unreadable image", (name, row)
            ledger.record("images: training pipeline", name, "counted skip", "textvqa: 'unreadable image'")
        else:
            assert expected == "ok" and row["images"][0].mode == "RGB", name
            ledger.record("images: training pipeline", name, "worked")


def test_generate_each_image_answers_or_names_the_file(hostile_images, tiny_model, ledger):
    for name, (path, expected) in hostile_images.items():
        prompt = {"messages": [{"role": "user", "content": "<image>\nWhat is this?"}], "images": [path]}
        try:
            reply = tiny_model.generate(prompt, max_new_tokens=2)[0]
        except ImageDecodeError as e:
            ok = path in str(e) and expected == "reject"
            ledger.record("images: generate", name, "clear error" if ok else "crash", str(e)[:100])
            assert ok, (name, str(e))
            continue
        except Exception as e:  # noqa: BLE001
            ledger.record("images: generate", name, "crash", repr(e))
            raise
        assert isinstance(reply, str) and expected == "ok", name
        ledger.record("images: generate", name, "worked")


def test_chat_cli_each_image_attaches_or_names_the_file(hostile_images, tiny_checkpoint, ledger):
    lines = []
    for _, (path, _) in hostile_images.items():
        lines += [f"/image {path}", "What is this?", "/reset"]
    proc = subprocess.run([sys.executable, "-m", "ghostvis_jax.chat", "--checkpoint", tiny_checkpoint,
                           "--max-new-tokens", "2"], input="\n".join(lines) + "\n/quit\n", capture_output=True,
                          text=True, timeout=240, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if proc.returncode != 0:
        ledger.record("images: chat CLI", "session", "crash", proc.stderr[-300:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[error] no reply" not in out and "Traceback" not in proc.stderr, out + proc.stderr[-2000:]
    blocks = out.split("[conversation reset]\n")
    assert len(blocks) == len(hostile_images) + 1, out
    for block, (name, (path, expected)) in zip(blocks, hostile_images.items()):
        if block.startswith(f"[image attached: {path}]\n"):
            replied = len(block.splitlines()) >= 2
            ledger.record("images: chat CLI", name, "worked" if replied and expected == "ok" else "crash")
            assert replied and expected == "ok", (name, block)
        else:
            ok = block.startswith("[error] image not attached: ") and path in block and expected == "reject"
            ledger.record("images: chat CLI", name, "clear error" if ok else "crash", block.splitlines()[0][:100])
            assert ok, (name, block)
