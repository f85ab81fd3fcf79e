"""Data: the synthetic entity benchmark, image decoding, and the samples table contract."""
