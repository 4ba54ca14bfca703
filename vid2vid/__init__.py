"""vid2vid: train, ablate and evaluate video-to-video synthesis (Wang et al., NeurIPS 2018) on Ray."""

__version__ = "0.1.0"
