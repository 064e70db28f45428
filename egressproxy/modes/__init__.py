"""Front protocols, one module per listener ``mode``."""
