"""pixsigma curation stage."""
