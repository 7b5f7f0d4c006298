// conv2d: placeholder, being written.
