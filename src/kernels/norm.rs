//! `shaders/norm.wgsl` (being written).
