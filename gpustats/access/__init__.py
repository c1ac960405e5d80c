"""Who may do what: device keys, the viewer login, and how much one client may hold of a worker."""
