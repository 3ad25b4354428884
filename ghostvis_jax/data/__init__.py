"""Everything that turns datasets into training batches.

  chat.py       ChatML rendering with image slots; loss mask; `render_prompt` for generation
  images.py     `load_image` (any source -> RGB) and `preprocess_image` (resize + normalize for the tower)
  synthetic.py  offline PIL shapes / words / bar charts (train and held-out splits)
  tasks.py      one adapter per dataset (row schema -> conversation) and the registry of hub ids / splits
  sources.py    loading by hub id or local folder; `TaskSource` with per-dataset skip counting
  recipes.py    answer-token-share recipes (roadmap §4.2 + synthetic)
  mixing.py     token-balanced, seeded, stratified mixture selection
  batching.py   per-example preparation and the fixed-shape, image-budget batcher
  pipeline.py   grain pipeline: `make_train_iterator`, `make_eval_iterator`, `eval_conversations`
"""
