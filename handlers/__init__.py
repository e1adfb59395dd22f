"""Built-in handler plugins (see ignite_fixmatch.plugins for the contract)."""
