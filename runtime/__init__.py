"""How the commands meet the person and the machine: errors and exit statuses, command-line flags,
crash-safe files, and the choice of device and precision."""
