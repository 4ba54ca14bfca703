"""Generation from trained checkpoints: long videos in constant memory, semantic manipulation
(relabelling), multimodal styles (per-class Gaussian mixtures over encoder features) and future
prediction (a baseline label-map predictor whose predictions vid2vid renders).

Submodules are imported explicitly (``from vid2vid.generate.inference import generate``) so that
importing the package stays cheap. Nothing here imports Ray.
"""
