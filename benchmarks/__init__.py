"""flaxbert's benchmark suite: pretraining-step grid against HF peers, SST-2 fine-tuning throughput,
a profile-based breakdown of the step, and A/B measurements of speed techniques. Programs, not tests."""
