"""The sampler's parts: per-step parameter tensors, counter-based noise, logits processing, logprob records."""
