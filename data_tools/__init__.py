"""Command-line tools that turn an image corpus into verified WebDataset shards."""
