"""Reading and writing the files shyped trusts: bounded reads, atomic replacement."""
