// matmul: placeholder, being written.
