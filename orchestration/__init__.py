"""The top layer: from flags to finished run folders (flags, typed configuration, run loop, resume, run
records, the centralized baseline, the Flower ServerApp wiring; README: Design)."""
