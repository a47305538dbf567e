"""The model zoo: ViT and the ResNet hybrid, position-embedding resampling, weight interchange."""
