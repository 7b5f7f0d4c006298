// elementwise: placeholder, being written.
