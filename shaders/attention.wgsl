// attention: placeholder, being written.
