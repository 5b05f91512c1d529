"""What every layer may import: the errors a user can act on, files written atomically, and keeping a local Ray on
the loopback address.
Imports nothing else of cl_serve."""
