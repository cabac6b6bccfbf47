"""Data in and scores out: the dataset-script API (plugin), chat/LLaVA/meta.json datasets, images
and videos for VLMs, and the scoring of predictions for evaluation."""
