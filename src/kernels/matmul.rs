//! `shaders/matmul.wgsl` (being written).
