"""Labelled and unlabelled ROI image collections (folders and CSVs) for pretraining and probes."""
