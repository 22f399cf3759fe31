"""From a validated spec to a plan: the pretraining runs, transfer fits and datamodel sweeps a
study needs, their content hashes, and what running them would cost. Nothing here starts Ray."""
