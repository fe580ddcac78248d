"""Tiny random assets in the released file layouts, and fixtures for tests and demos.

assets.py       Wan folders, umT5, Wan VAE, TAEHV and a whole tiny `checkpoint_dir` (scripts/make_tiny_checkpoints.py)
videoreward.py  a tiny VideoReward (VideoAlign) checkpoint; imagereward.py: a tiny ImageReward
corpus.py       the captions the tiny tokenizers are trained on
closed_forms.py closed forms the tests compare against, written independently of the code under test
dist_worker.py  the torchrun worker of tests/test_training_parallel.py
"""
