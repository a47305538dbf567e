"""The input stream: shard sets, decoding and augmentation, and the resumable train / eval streams."""
