"""Datasets: the generated "scenes" corpus, readers for public caption datasets, feature cache."""
