"""pixsigma training stage."""
