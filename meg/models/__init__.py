"""The embedded model family meg-tiny: data, training, judge, loading by name."""
