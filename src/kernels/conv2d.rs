//! `shaders/conv2d.wgsl` (being written).
