"""Training scripts, installed as `punkdiff.scripts` so `punkdiff train` runs the very same loop."""
