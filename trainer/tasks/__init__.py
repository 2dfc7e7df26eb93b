"""What is trained: the tokenizer and DiT tasks (the Task protocol of trainer/engine/protocols.py), the
latents they share (frozen tokenizer, statistics, cache), sampling, the dataset splits, and the one
way to run a training (training.py)."""
