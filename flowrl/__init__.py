"""flowrl: reinforcement-learning post-training of flow-matching text-to-image models (and VLMs) on one
policy-gradient core. See README.md for the two commands that install/run and test it."""

__version__ = "0.1.0"
