"""The inference side that fine-tuning and prediction share: example records, featurizers, length-bucketed and
packed batches, and running a head's forward pass over features (`predict`)."""
