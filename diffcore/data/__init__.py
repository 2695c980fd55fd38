"""Data: datasets, transforms, bucketing, batching and caches."""
