"""muonft: fine-tune pretrained models with Muon without the optimizer-mismatch trap."""

__version__ = "0.1.0"
