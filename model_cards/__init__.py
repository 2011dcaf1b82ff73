"""Jinja templates for the README.md model cards that `punkdiff.hub.export_pipeline` writes."""
