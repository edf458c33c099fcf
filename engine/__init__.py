"""CMT engine: pre-training, consistency mid-training and post-training of few-step flow-map models."""
__version__ = "0.1.0"
