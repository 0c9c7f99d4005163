"""What a received instance is: its Part 10 layout (the walk that finds the
Pixel Data and the frames) and the attributes the catalog keeps, read from its header.
Imports the catalog's records and sequences, and errors."""
