"""kho bench: synthetic phantoms and the storage sizing run (a command, like kho.cli:
it builds an Archive)."""
