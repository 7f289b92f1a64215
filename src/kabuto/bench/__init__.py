"""`make bench`: Kabuto against the bare VMM floor, side by side in one run, as ratios."""
