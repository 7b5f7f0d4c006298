// norm: placeholder, being written.
