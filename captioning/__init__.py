"""pixsigma captioning stage."""
