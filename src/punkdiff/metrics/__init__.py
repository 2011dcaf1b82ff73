"""Offline evaluation: metrics that need no download, each printed beside its real-vs-real floor."""
