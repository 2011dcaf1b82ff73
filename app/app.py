"""punkdiff web app, as a Hugging Face Space's `app.py` (or `python app/app.py` locally).

The folders come from environment variables (a Space's "Variables"): PUNKDIFF_MODEL_ROOTS and
PUNKDIFF_DATA_ROOTS (lists separated by ':'), PUNKDIFF_RUN_ROOT (where runs and images are written).
Gradio reads GRADIO_SERVER_NAME, which a Space sets to 0.0.0.0; anywhere else it binds 127.0.0.1.
"""

from punkdiff.app import build_app, launch
from punkdiff.roots import Roots

demo = build_app(Roots.from_env())

if __name__ == "__main__":
    launch(demo)
