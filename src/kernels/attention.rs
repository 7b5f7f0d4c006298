//! `shaders/attention.wgsl` (being written).
