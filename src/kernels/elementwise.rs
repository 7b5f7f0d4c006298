//! `shaders/elementwise.wgsl` (being written).
