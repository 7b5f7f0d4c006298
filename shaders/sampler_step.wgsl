// sampler_step: placeholder, being written.
