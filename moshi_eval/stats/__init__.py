"""Statistics: per-frame curves, report positions, slopes and buckets (`metrics`), bootstrap intervals (`bootstrap`)."""
