"""Working with finished runs: comparing, plotting and sweeping."""
