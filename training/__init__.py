"""What both methods and every engine share: a client's local steps, in-context evaluation and its diagnostics."""
