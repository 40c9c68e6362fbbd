"""Code that proves a model directory loads on its own, with nothing of this repo importable.

Prepend ISOLATE_FROM_REPO to a `python -c` program: it removes the editable-install finder
and the repository's paths from sys.path, then checks that none of our packages imports.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ISOLATE_FROM_REPO = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path = [p for p in sys.path if p and (not p.startswith({str(REPO)!r}) or "site-packages" in p)]
for _name in ("mvlm_engine", "simone_transformer", "prioritary_mvlm", "mvlm_trainer"):
    try:
        __import__(_name)
    except ImportError:
        pass
    else:
        raise SystemExit(_name + " is importable: the isolation failed")
"""
