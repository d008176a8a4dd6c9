"""Drop-in integrations of spendgate into gateways (each imports its gateway only in its own module)."""
