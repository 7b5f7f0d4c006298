//! `shaders/sampler_step.wgsl` (being written).
