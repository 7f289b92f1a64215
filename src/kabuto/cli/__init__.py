"""The `kabuto` command line."""
