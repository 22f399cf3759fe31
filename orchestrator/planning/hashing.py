"""Content hashes: how a finished result is recognized in MLflow.

Every pretraining run, transfer fit and datamodel sweep carries a ``config_hash`` over
everything that determines its result (settings, data fingerprints, view, code version); a
FINISHED run with that hash means the work is done.
"""

from __future__ import annotations

import hashlib
import json

# The code version inside every content hash. It is not the package version (which moves with
# every release, deployment tags included): bump it only when a change alters what a pretraining
# run or a transfer fit computes (loops, models, views, probes), so that every study recomputes
# instead of reusing the old code's results.
RESULTS_VERSION = "0.3.0"


def content_hash(obj) -> str:
    payload = json.dumps({"code": RESULTS_VERSION, "config": obj}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
