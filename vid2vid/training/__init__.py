"""Training without a cluster: the G-then-D step, its inputs, the schedule, the engine interface.

Nothing here imports Ray or DeepSpeed: :mod:`vid2vid.platform` composes these pieces into Ray Train
workers with DeepSpeed engines; the unit tests and the plain-PyTorch benchmarks run them directly.
"""
