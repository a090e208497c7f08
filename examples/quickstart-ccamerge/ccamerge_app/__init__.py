"""ccamerge-app: Flower's PyTorch quickstart, merging with CCAMerge."""
