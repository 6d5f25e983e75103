"""What both methods share: local steps, evaluation, the centralized baseline, the run loop."""
