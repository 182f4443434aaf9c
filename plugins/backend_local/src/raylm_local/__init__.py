"""raylm's `local` backend: Ray on this machine, or an existing cluster by address."""
