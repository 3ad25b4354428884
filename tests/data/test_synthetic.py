import numpy as np

from ghostvis_jax.data import chat, synthetic


def test_deterministic_and_splits_differ():
    a = synthetic.make_example("shapes_vqa", 7, seed=3, image_size=32)
    b = synthetic.make_example("shapes_vqa", 7, seed=3, image_size=32)
    assert a["messages"] == b["messages"]
    assert np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0]))
    train = {synthetic.make_example("bar_chart", i, split="train", image_size=32)["id"] for i in range(20)}
    held = {synthetic.make_example("bar_chart", i, split="heldout", image_size=32)["id"] for i in range(20)}
    assert not train & held
    imgs_train = [np.asarray(synthetic.make_example("bar_chart", i, split="train", image_size=32)["images"][0])
                  for i in range(5)]
    imgs_held = [np.asarray(synthetic.make_example("bar_chart", i, split="heldout", image_size=32)["images"][0])
                 for i in range(5)]
    assert any(not np.array_equal(x, y) for x, y in zip(imgs_train, imgs_held))


def test_every_task_renders_with_one_word_answers(tokenizer):
    for task in synthetic.TASKS:
        src = synthetic.SyntheticSource(task, num_examples=30, image_size=32, seed=1)
        for i in range(len(src)):
            ex = src[i]
            assert ex["images"][0].size == (32, 32) and ex["images"][0].mode == "RGB"
            r = chat.render_conversation(tokenizer, ex, 4)
            assert r.num_images == 1
            if task != "shapes_caption":
                assert len(ex["answers"][0].split()) == 1
                assert ex["messages"][-1]["content"] == ex["answers"][0]


def test_vqa_answers_match_the_drawing():
    # The color answer is the color actually drawn; the count answer is the number of drawn blobs' quadrants.
    for i in range(40):
        ex = synthetic.make_example("shapes_vqa", i, image_size=64)
        arr = np.asarray(ex["images"][0]).astype(int)
        q = ex["question"]
        if q == synthetic.VQA_QUESTIONS["color"]:
            rgb = synthetic.COLORS[ex["answers"][0]]
            assert (np.abs(arr - rgb).sum(-1) < 10).sum() > 50
        if q == synthetic.VQA_QUESTIONS["count"]:
            n = int(ex["answers"][0])
            painted = (arr.sum(-1) < 700)
            h = 32
            quads = [painted[:h, :h], painted[:h, h:], painted[h:, :h], painted[h:, h:]]
            if n > 1:
                assert sum(int(qd.sum() > 20) for qd in quads) == n


def test_tokenizer_covers_synthetic_vocabulary_compactly(tokenizer):
    assert 300 <= len(tokenizer) <= 1000
    for word in synthetic.VOCABULARY_WORDS:
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) <= 2, word
