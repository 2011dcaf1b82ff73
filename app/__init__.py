"""The punkdiff web app (Gradio): `punkdiff ui`, or `app/app.py` as a Hugging Face Space's `app.py`.

Installed as `punkdiff.app` (with `pip install 'punkdiff[app]'`). The page only wires widgets to the library:
`punkdiff.studio` (generate, inpaint, reconstruct), `punkdiff.runs` (training runs), `punkdiff.eval_runs`
(evaluations) and `punkdiff.roots` (which folders it may touch).
"""

from __future__ import annotations

import os

# Nothing leaves the machine: no usage statistics, no version check (set before Gradio is imported).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from punkdiff.app.ui import build_app, launch  # noqa: E402

__all__ = ["build_app", "launch"]
