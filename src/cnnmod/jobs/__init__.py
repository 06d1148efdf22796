"""What the commands run, as library calls: folders in, a folder out, energy metered, a JSON result."""
